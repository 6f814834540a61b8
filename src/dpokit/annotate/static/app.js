// The labelling page. Every text from the server is put in the page with textContent: a response holding
// markup or a <script> is shown as the characters it is, never run or rendered.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const state = { item: null, busy: false, token: null, name: null, tokensRequired: false };

  const params = new URLSearchParams(window.location.search);
  if (params.get("token")) {
    localStorage.setItem("dpokit-token", params.get("token"));
    history.replaceState(null, "", window.location.pathname);  // keep the token out of the address bar
  }
  state.token = localStorage.getItem("dpokit-token");
  state.name = localStorage.getItem("dpokit-annotator");

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    if (state.token) h["Authorization"] = "Bearer " + state.token;
    else if (state.name) h["X-Annotator"] = state.name;
    return h;
  }

  async function api(path, body) {
    const init = body === undefined ? { headers: headers(false) }
      : { method: "POST", headers: headers(true), body: JSON.stringify(body) };
    const response = await fetch(path, init);
    let data = {};
    try { data = await response.json(); } catch (e) { data = { error: "unreadable answer" }; }
    if (!response.ok) {
      const err = new Error(data.error || ("HTTP " + response.status));
      err.status = response.status;
      throw err;
    }
    return data;
  }

  function show(id, visible) { $(id).hidden = !visible; }
  function say(text) { $("message").textContent = text || ""; }

  function renderText(container, value) {
    // A text, or a list of {role, content} messages rendered turn by turn.
    container.replaceChildren();
    const turns = typeof value === "string" ? [{ role: null, content: value }] : value;
    for (const m of turns) {
      const turn = document.createElement("div");
      turn.className = "turn";
      if (m.role) {
        const role = document.createElement("div");
        role.className = "role";
        role.textContent = m.role;
        turn.appendChild(role);
      }
      const content = document.createElement("div");
      content.className = "content";
      content.textContent = typeof m.content === "string" ? m.content : JSON.stringify(m.content);
      turn.appendChild(content);
      container.appendChild(turn);
    }
  }

  function renderProgress(p) {
    if (!p) return;
    $("progress").textContent = "you: " + p.yours + " decided · items complete: " + p.complete + " of " + p.items;
  }

  function setBusy(busy) {
    state.busy = busy;
    for (const b of document.querySelectorAll("button.choose")) b.disabled = busy;
  }

  async function loadNext() {
    setBusy(true);
    try {
      const data = await api("/api/next");
      renderProgress(data.progress);
      state.item = data.item;
      if (!data.item) {
        show("work", false);
        show("done", true);
        return;
      }
      const it = data.item;
      const prompt = typeof it.prompt === "string" && it.system
        ? [{ role: "system", content: it.system }, { role: "user", content: it.prompt }] : it.prompt;
      renderText($("prompt"), prompt);
      renderText($("left"), it.left);
      renderText($("right"), it.right);
      $("rationale").value = "";
      $("work").dataset.item = it.id;
      show("done", false);
      show("work", true);
      say("");
      window.scrollTo(0, 0);
    } catch (e) {
      say("Could not load the next item: " + e.message);
    } finally {
      setBusy(false);
    }
  }

  async function decide(choice) {
    if (state.busy || !state.item) return;
    setBusy(true);
    say("saving…");
    try {
      // The page moves on only once the server has committed the decision.
      await api("/api/decision", { item: state.item.id, choice: choice, rationale: $("rationale").value });
      state.item = null;
      await loadNext();
    } catch (e) {
      if (e.status === 409) { await loadNext(); say("That item was no longer yours: " + e.message); return; }
      say("Not saved (" + e.message + "); try again.");
      setBusy(false);
    }
  }

  async function start() {
    say("");
    try {
      const s = await api("/api/session");
      state.tokensRequired = s.tokens_required;
      if (s.guidelines) { $("guidelines").textContent = s.guidelines; show("guidelines-box", true); }
      if (!s.annotator) {
        show("work", false);
        if (s.tokens_required) { say("This server needs your personal link (it ends in ?token=...)."); return; }
        show("login", true);
        $("name").focus();
        return;
      }
      $("who").textContent = "annotator: " + s.annotator;
      show("switch", !s.tokens_required);
      show("login", false);
      await loadNext();
    } catch (e) {
      if (e.status === 401 || e.status === 403) {
        localStorage.removeItem("dpokit-token");
        state.token = null;
      }
      if (!state.token && e.status === 400) {
        localStorage.removeItem("dpokit-annotator");
        state.name = null;
        show("login", true);
      }
      say(e.message);
    }
  }

  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("name").value.trim();
    if (!name) return;
    localStorage.setItem("dpokit-annotator", name);
    state.name = name;
    $("name").blur();  // the keys 1 / 2 / t / s go to the page, not to the hidden field
    start();
  });
  $("switch").addEventListener("click", () => {
    localStorage.removeItem("dpokit-annotator");
    state.name = null;
    window.location.reload();
  });
  for (const b of document.querySelectorAll("button.choose")) {
    b.addEventListener("click", () => decide(b.dataset.choice));
  }
  const KEYS = { "1": "left", "2": "right", "t": "tie", "s": "skip" };
  document.addEventListener("keydown", (event) => {
    const tag = event.target && event.target.tagName;
    if (tag === "TEXTAREA" || tag === "INPUT" || event.ctrlKey || event.metaKey || event.altKey) return;
    const choice = KEYS[event.key];
    if (choice && !$("work").hidden) { event.preventDefault(); decide(choice); }
  });
  start();
})();
