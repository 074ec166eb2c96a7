// pyheadscale admin console: small progressive enhancements. Every page works without it.
"use strict";
(function () {
  // Live online state on the machines list: refresh each row's status every 5 seconds.
  const table = document.querySelector("table[data-live]");
  if (table) {
    const refresh = async () => {
      try {
        const r = await fetch(table.dataset.live, { credentials: "same-origin" });
        if (!r.ok) return;
        const data = await r.json();
        for (const n of data.nodes) {
          const row = table.querySelector(`tr[data-node-id="${n.id}"]`);
          if (!row) continue;
          const st = row.querySelector('[data-field="status"]');
          if (st && st.textContent !== n.status) {
            st.textContent = n.status;
            st.className = "status status-" + n.status;
          }
          const seen = row.querySelector('[data-field="lastSeen"]');
          if (seen) seen.textContent = n.lastSeen;
        }
      } catch (e) { /* offline for a moment: try again at the next tick */ }
    };
    setInterval(refresh, 5000);
  }

  // Copy buttons (the new key is shown once).
  for (const b of document.querySelectorAll("button.copy[data-copy]")) {
    b.addEventListener("click", async () => {
      const field = document.getElementById(b.dataset.copy);
      field.select();
      try { await navigator.clipboard.writeText(field.value); b.textContent = "Copied"; }
      catch (e) { b.textContent = "Press Ctrl+C"; }
    });
  }

  // HuJSON highlighting behind the policy textarea (the text stays in the textarea).
  const TOKEN = /(\/\/[^\n]*|\/\*[\s\S]*?(?:\*\/|$))|("(?:[^"\\\n]|\\.)*"?)|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|\b(true|false|null)\b|([{}\[\],:])/g;
  const esc = (s) => s.replace(/[&<>]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;" }[c]));
  const highlight = (text) => {
    let out = "", pos = 0, m;
    TOKEN.lastIndex = 0;
    while ((m = TOKEN.exec(text)) !== null) {
      out += esc(text.slice(pos, m.index));
      let kind = m[1] ? "comment" : m[2] ? "string" : m[3] ? "number" : m[4] ? "literal" : "punct";
      if (kind === "string" && /^\s*:/.test(text.slice(TOKEN.lastIndex, TOKEN.lastIndex + 64))) kind = "key";
      out += `<span class="hj-${kind}">${esc(m[0])}</span>`;
      pos = TOKEN.lastIndex;
    }
    return out + esc(text.slice(pos)) + "\n";
  };
  const editor = document.querySelector(".editor");
  const area = editor && editor.querySelector("textarea");
  if (area) {
    const pre = document.createElement("pre");
    pre.className = "hl";
    pre.setAttribute("aria-hidden", "true");
    editor.insertBefore(pre, area);
    editor.classList.add("live");
    const sync = () => { pre.innerHTML = highlight(area.value); pre.scrollTop = area.scrollTop; };
    area.addEventListener("input", sync);
    area.addEventListener("scroll", () => { pre.scrollTop = area.scrollTop; });
    sync();
    // "line L, column C" links put the caret at the problem.
    for (const a of document.querySelectorAll("a.at[data-line]")) {
      a.addEventListener("click", (ev) => {
        ev.preventDefault();
        const lines = area.value.split("\n");
        const line = Math.min(+a.dataset.line, lines.length);
        let off = 0;
        for (let i = 0; i < line - 1; i++) off += lines[i].length + 1;
        off += Math.max(+a.dataset.column - 1, 0);
        area.focus();
        area.setSelectionRange(off, off);
      });
    }
  }
})();
