"""ML operations on canonical LoRAs: inspect, convert, extract, resize, merge, sweep."""
