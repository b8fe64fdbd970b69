// lorahub gallery: search as you type, copy buttons, the α slider, and parts loaded after the page.
// Plain JavaScript, no dependencies; every page works without it (forms and links), only slower.
"use strict";
(function () {
  // --- search as you type: the results part of the gallery is fetched again and swapped in
  const form = document.getElementById("search");
  const results = document.getElementById("results");
  if (form && results) {
    let timer = null;
    let latest = 0;
    const run = function () {
      const params = new URLSearchParams(new FormData(form));
      for (const key of Array.from(params.keys())) {
        if (!params.get(key)) params.delete(key);
      }
      const qs = params.toString();
      const mine = ++latest;
      fetch("/?" + (qs ? qs + "&" : "") + "fragment=1", {credentials: "same-origin"})
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          if (mine !== latest) return;          // an older answer: a newer search is on its way
          results.innerHTML = html;             // server-rendered, escaped HTML
          results.dataset.query = qs;
          history.replaceState(null, "", qs ? "/?" + qs : "/");
        })
        .catch(function () { /* keep the current results */ });
    };
    form.addEventListener("input", function (ev) {
      clearTimeout(timer);
      timer = setTimeout(run, ev.target.tagName === "SELECT" ? 0 : 150);
    });
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      clearTimeout(timer);
      run();
    });
  }

  // --- copy buttons: data-copy holds the text
  const flash = function (button, text) {
    const old = button.dataset.label || button.textContent;
    button.dataset.label = old;
    button.textContent = text;
    button.classList.add("done");
    setTimeout(function () { button.textContent = old; button.classList.remove("done"); }, 1200);
  };
  document.addEventListener("click", function (ev) {
    const button = ev.target.closest("[data-copy]");
    if (!button) return;
    navigator.clipboard.writeText(button.dataset.copy).then(
      function () { flash(button, "copied"); },
      function () { flash(button, "copy failed"); });
  });

  // --- the α slider scrubs the frames of a sweep animation
  for (const box of document.querySelectorAll(".scrub[data-frames]")) {
    const img = box.querySelector("img.frame");
    const slider = box.querySelector("input.alpha");
    const out = box.querySelector("output.frame-label");
    const labels = Array.from(box.querySelectorAll("datalist option")).map(function (o) { return o.label; });
    const n = parseInt(box.dataset.frames, 10);
    for (let i = 1; i < n; i++) { (new Image()).src = box.dataset.src + i; }   // preload
    slider.addEventListener("input", function () {
      const i = parseInt(slider.value, 10);
      img.src = box.dataset.src + i;
      img.dataset.frame = String(i);
      img.alt = "frame " + (i + 1) + " of " + n;
      out.textContent = labels[i] || ("frame " + (i + 1));
    });
  }

  // --- parts computed on demand (heat map, per-layer table, diff verdicts)
  for (const el of document.querySelectorAll("[data-fragment]")) {
    fetch(el.dataset.fragment, {credentials: "same-origin"})
      .then(function (r) { return r.text(); })
      .then(function (html) { el.innerHTML = html; el.classList.add("loaded"); })
      .catch(function () { el.textContent = "could not load this part"; });
  }
})();
