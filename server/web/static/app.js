// fleetpush dashboard: live refresh of <main>, a device's log panel, confirmations.
// No build step, no dependency: served by the releaser (server/web/static/).
(function () {
  "use strict";
  var main = document.getElementById("main");
  var timer = null;
  var busy = false;

  function typing() {
    var a = document.activeElement;
    return a && main.contains(a) && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName);
  }

  // Re-fetch this page's <main> (the server answers only it for X-Fragment: main).
  function refresh() {
    timer = null;
    if (busy || typing()) { timer = setTimeout(refresh, 300); return; }
    busy = true;
    fetch(location.href, { headers: { "X-Fragment": "main" }, credentials: "same-origin" })
      .then(function (r) {
        // Signed out meanwhile (the session ended): go to the login page itself.
        if (r.redirected) { location.href = r.url; return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html !== null) {
          main.innerHTML = html;
          main.setAttribute("data-refreshed", String(Date.now()));
        }
      })
      .catch(function () {})
      .then(function () { busy = false; });
  }

  if (main && main.hasAttribute("data-live") && window.EventSource) {
    var live = new EventSource("/live");
    live.onmessage = function () { if (!timer) { timer = setTimeout(refresh, 50); } };
    live.onopen = function () { document.body.setAttribute("data-live-open", "1"); };
  }

  var log = document.getElementById("log");
  if (log && log.dataset.src && window.EventSource) {
    var src = new EventSource(log.dataset.src);
    src.onmessage = function (e) {
      var batch = JSON.parse(e.data);
      var text = batch.lines.join("\n");
      if (batch.dropped) { text = "[" + batch.dropped + " line(s) dropped]\n" + text; }
      if (text) { log.textContent += text + "\n"; }
      var lines = log.textContent.split("\n");
      if (lines.length > 2000) { log.textContent = lines.slice(-2000).join("\n"); }
      log.scrollTop = log.scrollHeight;
    };
    src.addEventListener("end", function (e) {
      log.textContent += "-- " + JSON.parse(e.data) + "\n";
      src.close();
    });
  }

  document.addEventListener("submit", function (e) {
    var button = e.submitter;
    if (button && button.value === "abort" && !confirm("Abort this deployment?")) {
      e.preventDefault();
    }
  });
})();
