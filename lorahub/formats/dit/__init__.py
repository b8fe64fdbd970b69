"""DiT families (Flux.1, SD3/3.5): their original layouts, fused q/k/v, and the kohya dialect in them.

Importing this package registers the families' kohya readers and writers with
:func:`lorahub.formats.names.register_family_dialect` (``flux``: BFL layout, :mod:`.flux`; ``sd3``: SAI
MMDiT layout, :mod:`.sd3`). :mod:`lorahub.formats.names` imports it the first time a family's dialect
is looked up, so every kohya read/write of these families goes through it.
"""

from __future__ import annotations

from lorahub.formats.dit import flux
from lorahub.formats.names import FamilyDialect, register_family_dialect

BUILTIN = {"flux": FamilyDialect(read_kohya=flux.read_kohya, write_kohya=flux.write_kohya)}
for _family, _dialect in BUILTIN.items():
    register_family_dialect(_family, _dialect)
