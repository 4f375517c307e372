// Plaudit labelling page: fetches the next task, collects one label, submits it exactly once.
//
// The service names the criteria to ask about (GET tasks/next: "criteria", each with its
// question). With one, the page asks it; with several and two responses, it asks one question per
// criterion ("Which response is more helpful?", "Which response is safer?") and stores one
// comparison per question answered (unanswered ones are left out). Rankings, ratings and
// corrections judge the only criterion, or "overall" when there are several.
//
// Every label is sent with an idempotency key made of the task, the kind of label and 128 random
// bits (crypto.getRandomValues) drawn once per task and kept in this tab's sessionStorage until
// the label is stored, so a retry after a lost answer (or a reload) is stored once by the server,
// and nobody else can guess the key to pre-empt it; the submit button is disabled while a
// submission is in flight, so a double click sends one request.
//
// A service that requires API keys gets one from the login form: it is kept in this browser's
// localStorage and sent as "Authorization: Bearer <key>" with every API call (never in URLs).
"use strict";

(() => {
  const ANNOTATOR_KEY = "plaudit.annotator";
  const API_KEY_KEY = "plaudit.apiKey";
  const SESSION_KEY = "plaudit.session";
  const NONCE_KEY = "plaudit.nonce.";
  const API = "api/v1/";
  const RATING_SCALE = [1, 5];
  const LETTERS = "ABCDEFGHIJKLMNOP";

  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  };

  const state = {
    annotator: localStorage.getItem(ANNOTATOR_KEY) || "",
    apiKey: localStorage.getItem(API_KEY_KEY) || "",
    task: null,
    selection: null,
    queue: null,
    mode: "choose", // or "rate"
    chosen: null, // index, two completions
    ranking: [], // indices best first, more than two
    ratings: new Map(), // index -> score
    criteria: [{ criterion: "overall", question: "Which response is better?" }],
    answers: new Map(), // criterion -> index of the preferred response (several criteria)
    question: 0, // the question the keys answer (several criteria)
    focus: 0,
    editing: null, // index of the completion being corrected
    busy: false,
    offline: false,
    session: loadSession(),
  };

  function loadSession() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "{}");
      return { labelled: saved.labelled || 0, skipped: saved.skipped || 0 };
    } catch {
      return { labelled: 0, skipped: 0 };
    }
  }

  function saveSession() {
    sessionStorage.setItem(SESSION_KEY, JSON.stringify(state.session));
  }

  // -- talking to the service ------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, body) {
      const detail = body && body.error ? body.error.message : "";
      super(detail || `HTTP ${status}`);
      this.status = status;
      this.code = body && body.error ? body.error.code : "";
      this.field = body && body.error ? body.error.field : null;
    }
  }

  async function api(method, path, body) {
    const init = { method, cache: "no-store", headers: {} };
    if (state.apiKey) init.headers["Authorization"] = `Bearer ${state.apiKey}`;
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(API + path, init);
    } catch {
      throw new ApiError(0, null); // the service did not answer at all
    }
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (!response.ok) throw new ApiError(response.status, data);
    setOnline();
    return data;
  }

  function describe(err) {
    if (!(err instanceof ApiError)) return `Something went wrong: ${err.message || err}`;
    if (err.status === 0) {
      return "Cannot reach the feedback service. Check your connection; nothing was saved.";
    }
    if (err.status === 503) {
      return "The feedback service is unavailable right now (its database is not answering). " +
        "Nothing was saved; try again in a moment.";
    }
    if (err.status === 429) return "The service is busy. Nothing was saved; try again.";
    if (err.status === 401) return "This service needs a valid API key: enter it to continue.";
    if (err.status === 403) {
      return "Your API key may not label here (it needs the submit_feedback role).";
    }
    return err.message;
  }

  function isOutage(err) {
    return err instanceof ApiError && (err.status === 0 || err.status === 503 ||
      err.status === 502 || err.status === 504);
  }

  // -- banner and connectivity ------------------------------------------------------------------
  let healthTimer = null;

  function showBanner(message, outage) {
    $("banner-text").textContent = message;
    $("banner").classList.toggle("outage", Boolean(outage));
    $("banner-retry").hidden = !outage;
    $("banner").hidden = false;
    if (outage) {
      state.offline = true;
      if (!healthTimer) healthTimer = setInterval(checkHealth, 3000);
    }
  }

  function hideBanner() {
    $("banner").hidden = true;
  }

  function setOnline() {
    if (!state.offline) return;
    state.offline = false;
    clearInterval(healthTimer);
    healthTimer = null;
    hideBanner();
  }

  async function checkHealth() {
    try {
      const response = await fetch("healthz", { cache: "no-store" });
      if (!response.ok) return;
    } catch {
      return;
    }
    setOnline();
    if (!state.task && state.annotator) loadNext();
  }

  function retryFromBanner() {
    hideBanner();
    if (state.task) submit();
    else loadNext();
  }

  // -- annotator ----------------------------------------------------------------------------------
  function showLogin() {
    for (const id of ["task", "empty", "loading"]) $(id).hidden = true;
    $("who").hidden = true;
    $("progress").hidden = true;
    $("login").hidden = false;
    $("annotator-input").value = state.annotator;
    $("api-key-input").value = state.apiKey;
    $("annotator-input").focus();
  }

  function isAuthError(err) {
    return err instanceof ApiError && (err.status === 401 || err.status === 403);
  }

  function login(event) {
    event.preventDefault();
    const value = $("annotator-input").value.trim();
    if (!value) return;
    state.annotator = value;
    localStorage.setItem(ANNOTATOR_KEY, value);
    state.apiKey = $("api-key-input").value.trim();
    if (state.apiKey) localStorage.setItem(API_KEY_KEY, state.apiKey);
    else localStorage.removeItem(API_KEY_KEY);
    hideBanner();
    $("login").hidden = true;
    document.activeElement.blur(); // shortcuts go to the page, not the hidden field
    start();
  }

  function start() {
    $("annotator-name").textContent = state.annotator;
    $("who").hidden = false;
    $("progress").hidden = false;
    renderProgress();
    loadNext();
  }

  // -- tasks ----------------------------------------------------------------------------------------
  async function loadNext() {
    state.task = null;
    $("task").hidden = true;
    $("empty").hidden = true;
    $("loading").hidden = false;
    try {
      const data = await api("GET", `tasks/next?annotator_id=${encodeURIComponent(state.annotator)}`);
      state.queue = data.queue;
      if (Array.isArray(data.criteria) && data.criteria.length) state.criteria = data.criteria;
      $("loading").hidden = true;
      if (!data.task) {
        $("empty").hidden = false;
      } else {
        showTask(data.task, data.selection);
      }
    } catch (err) {
      $("loading").hidden = true;
      showBanner(describe(err), isOutage(err));
      if (isAuthError(err)) showLogin();
    }
    renderProgress();
  }

  function showTask(task, selection) {
    Object.assign(state, {
      task, selection, chosen: null, ranking: [], ratings: new Map(), focus: 0, editing: null,
      answers: new Map(), question: 0,
    });
    state.mode = "choose";
    $("comment").value = "";
    $("status").textContent = "";
    $("task-id").textContent = `Task ${task.task_id}`;
    $("task-reason").textContent = reasonText(selection);
    renderPrompt(task.prompt);
    renderCompletions();
    renderQuestions();
    $("task").hidden = false;
    refresh();
  }

  // -- several criteria: one question each -----------------------------------------------------
  function askingEach() {
    return state.criteria.length > 1 && state.task && state.task.completions.length === 2 &&
      state.mode === "choose" && state.editing === null;
  }

  function renderQuestions() {
    const box = $("questions");
    box.replaceChildren();
    if (state.criteria.length < 2 || state.task.completions.length !== 2) return;
    state.criteria.forEach(({ criterion, question }, number) => {
      const set = el("fieldset", "question");
      set.dataset.criterion = criterion;
      const legend = el("legend", "", question);
      legend.id = `question-${number}`;
      const answers = el("div", "answers");
      answers.setAttribute("role", "radiogroup");
      answers.setAttribute("aria-labelledby", legend.id);
      for (const index of [0, 1]) {
        const button = el("button", "answer", `Response ${LETTERS[index]}`);
        button.type = "button";
        button.dataset.index = String(index);
        button.setAttribute("role", "radio");
        button.setAttribute("aria-checked", "false");
        button.addEventListener("click", () => answer(number, index, false));
        answers.append(button);
      }
      set.append(legend, answers);
      box.append(set);
    });
  }

  // Answer question `number` with response `index`; `advance` moves on to the next unanswered.
  function answer(number, index, advance) {
    const { criterion } = state.criteria[number];
    if (state.answers.get(criterion) === index && !advance) state.answers.delete(criterion);
    else state.answers.set(criterion, index);
    state.question = number;
    if (advance) {
      for (let step = 1; step < state.criteria.length; step += 1) {
        const next = (number + step) % state.criteria.length;
        if (!state.answers.has(state.criteria[next].criterion)) {
          state.question = next;
          break;
        }
      }
    }
    refresh();
  }

  function moveQuestion(delta) {
    const n = state.criteria.length;
    state.question = (state.question + delta + n) % n;
    refresh();
  }

  function reasonText(selection) {
    if (!selection) return "";
    switch (selection.reason) {
      case "uncertain":
        return selection.margin === null || selection.margin === undefined
          ? "the reward model is least sure here"
          : `the reward model is least sure here (reward gap ${selection.margin.toFixed(3)})`;
      case "explore":
        return "picked at random, to keep the data unbiased";
      case "random":
        return "picked at random";
      case "resumed":
        return "you had this one open";
      default:
        return "next in the queue";
    }
  }

  function renderPrompt(prompt) {
    const box = $("prompt");
    box.replaceChildren();
    const parts = prompt.split(/\n\n(Human|Assistant): ?/);
    if (parts.length < 3) {
      box.append(el("div", "turn plain", prompt.trim()));
      return;
    }
    if (parts[0].trim()) box.append(el("div", "turn plain", parts[0].trim()));
    for (let i = 1; i < parts.length; i += 2) {
      const speaker = parts[i];
      const text = (parts[i + 1] || "").trim();
      if (!text) continue; // the open "Assistant:" turn the completions answer
      const turn = el("div", `turn ${speaker === "Human" ? "human" : "assistant"}`);
      turn.append(el("span", "speaker", speaker), el("div", "said", text));
      box.append(turn);
    }
  }

  function renderCompletions() {
    const box = $("completions");
    box.replaceChildren();
    const n = state.task.completions.length;
    box.dataset.count = String(n);
    state.task.completions.forEach((text, index) => {
      const card = el("article", "completion");
      card.dataset.index = String(index);
      card.tabIndex = 0;
      const head = el("header", "completion-head");
      const name = el("span", "name", `Response ${LETTERS[index]}`);
      const key = el("kbd", "", String(index + 1));
      const badge = el("span", "badge");
      const edit = el("button", "edit link", "Edit");
      edit.type = "button";
      edit.title = "Edit into a correction (e)";
      edit.addEventListener("click", (event) => {
        event.stopPropagation();
        startEdit(index);
      });
      head.append(name, key, badge, edit);
      const body = el("div", "text", text);
      const foot = el("footer", "completion-foot");
      card.append(head, body, foot);
      card.addEventListener("click", (event) => {
        if (event.target.closest("textarea, button")) return;
        act(index);
      });
      card.addEventListener("focus", () => {
        state.focus = index;
        refresh();
      });
      box.append(card);
    });
    renderFeet();
  }

  function renderFeet() {
    const n = state.task.completions.length;
    for (const card of document.querySelectorAll(".completion")) {
      const index = Number(card.dataset.index);
      const foot = card.querySelector(".completion-foot");
      foot.replaceChildren();
      if (state.mode === "rate") {
        const group = el("div", "scale");
        group.setAttribute("role", "radiogroup");
        group.setAttribute("aria-label", `Rating of response ${LETTERS[index]}`);
        for (let score = RATING_SCALE[0]; score <= RATING_SCALE[1]; score += 1) {
          const button = el("button", "score", String(score));
          button.type = "button";
          button.dataset.score = String(score);
          button.addEventListener("click", (event) => {
            event.stopPropagation();
            rate(index, score);
          });
          group.append(button);
        }
        foot.append(group);
      } else if (n === 2 && state.criteria.length > 1) {
        // several criteria: the questions below the responses take the answers
      } else if (n === 2) {
        const button = el("button", "choose", `Prefer ${LETTERS[index]}`);
        button.type = "button";
        button.addEventListener("click", (event) => {
          event.stopPropagation();
          choose(index);
        });
        foot.append(button);
      } else {
        const button = el("button", "choose", "Rank next");
        button.type = "button";
        button.addEventListener("click", (event) => {
          event.stopPropagation();
          toggleRank(index);
        });
        foot.append(button);
      }
    }
  }

  // -- labelling actions ----------------------------------------------------------------------------
  function act(index) {
    if (askingEach()) {
      answer(state.question, index, true);
    } else if (state.mode === "rate") {
      state.focus = index;
      refresh();
    } else if (state.task.completions.length === 2) {
      choose(index);
    } else {
      toggleRank(index);
    }
  }

  function choose(index) {
    state.chosen = state.chosen === index ? null : index;
    refresh();
  }

  function toggleRank(index) {
    const at = state.ranking.indexOf(index);
    if (at >= 0) state.ranking.splice(at, 1);
    else state.ranking.push(index);
    const n = state.task.completions.length;
    if (state.ranking.length === n - 1) { // the last one ranks itself
      for (let i = 0; i < n; i += 1) if (!state.ranking.includes(i)) state.ranking.push(i);
    }
    refresh();
  }

  function rate(index, score) {
    state.ratings.set(index, score);
    const n = state.task.completions.length;
    for (let step = 1; step <= n; step += 1) { // move on to the next unrated response
      const next = (index + step) % n;
      if (!state.ratings.has(next)) {
        state.focus = next;
        break;
      }
    }
    refresh();
  }

  function setMode(mode) {
    if (state.mode === mode) return;
    state.mode = mode;
    renderFeet();
    refresh();
  }

  function startEdit(index) {
    if (state.editing !== null) cancelEdit();
    state.editing = index;
    const card = document.querySelector(`.completion[data-index="${index}"]`);
    const body = card.querySelector(".text");
    const area = el("textarea", "text editing");
    area.value = state.task.completions[index];
    area.rows = Math.min(16, Math.max(4, area.value.split("\n").length + 1));
    area.setAttribute("aria-label", `Corrected response ${LETTERS[index]}`);
    body.replaceWith(area);
    area.focus();
    area.setSelectionRange(area.value.length, area.value.length);
    refresh();
  }

  function cancelEdit() {
    if (state.editing === null) return;
    const card = document.querySelector(`.completion[data-index="${state.editing}"]`);
    const area = card.querySelector("textarea.text");
    area.replaceWith(el("div", "text", state.task.completions[state.editing]));
    state.editing = null;
    refresh();
  }

  function editedText() {
    if (state.editing === null) return null;
    const card = document.querySelector(`.completion[data-index="${state.editing}"]`);
    return card.querySelector("textarea.text").value;
  }

  function clearChoice() {
    if (state.editing !== null) cancelEdit();
    else {
      state.chosen = null;
      state.ranking = [];
      state.ratings = new Map();
      state.answers = new Map();
      state.question = 0;
      refresh();
    }
  }

  function moveFocus(delta) {
    const n = state.task.completions.length;
    state.focus = (state.focus + delta + n) % n;
    refresh();
  }

  // -- submitting ---------------------------------------------------------------------------------
  // The random part of a task's idempotency keys: drawn once per task, kept until it is labelled.
  function nonce(taskId) {
    const name = NONCE_KEY + taskId;
    let value = sessionStorage.getItem(name);
    if (!value) {
      const bytes = new Uint8Array(16);
      crypto.getRandomValues(bytes);
      value = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
      sessionStorage.setItem(name, value);
    }
    return value;
  }

  function forgetNonce(taskId) {
    sessionStorage.removeItem(NONCE_KEY + taskId);
  }

  function key(kind) {
    return `t${state.task.task_id}.${kind}.${nonce(state.task.task_id)}`;
  }

  // The label as API calls, or a message saying what is missing.
  function submissions() {
    const task = state.task;
    const texts = task.completions;
    const comment = $("comment").value.trim();
    const only = state.criteria.length === 1 ? state.criteria[0].criterion : "overall";
    const common = (kind, criterion = only) => ({
      prompt: task.prompt,
      annotator_id: state.annotator,
      idempotency_key: key(kind),
      task_id: task.task_id,
      metadata: comment ? { comment, ui: "labelling-page" } : { ui: "labelling-page" },
      criterion,
    });
    if (state.editing !== null) {
      const corrected = editedText();
      const original = texts[state.editing];
      if (corrected.trim() === original.trim()) {
        return "Change the text to submit a correction, or press Esc to stop editing.";
      }
      return [["corrections", { ...common("correction"), completion: original, corrected }]];
    }
    if (state.mode === "rate") {
      if (state.ratings.size < texts.length) return "Rate every response first.";
      return texts.map((completion, index) => ["ratings", {
        ...common(`rating${index}`),
        completion,
        score: state.ratings.get(index),
        scale_min: RATING_SCALE[0],
        scale_max: RATING_SCALE[1],
      }]);
    }
    if (texts.length === 2 && state.criteria.length > 1) {
      const answered = state.criteria.filter(({ criterion }) => state.answers.has(criterion));
      if (!answered.length) return "Answer at least one question first.";
      return answered.map(({ criterion }) => {
        const chosen = state.answers.get(criterion);
        return ["comparisons", {
          ...common(`comparison-${criterion}`, criterion),
          chosen: texts[chosen],
          rejected: texts[1 - chosen],
        }];
      });
    }
    if (texts.length === 2) {
      if (state.chosen === null) return "Choose the better response first.";
      return [["comparisons", {
        ...common("comparison"),
        chosen: texts[state.chosen],
        rejected: texts[1 - state.chosen],
      }]];
    }
    if (state.ranking.length < texts.length) return "Rank the responses first, best first.";
    return [["rankings", { ...common("ranking"), completions: state.ranking.map((i) => texts[i]) }]];
  }

  async function submit() {
    if (state.busy || !state.task) return;
    const calls = submissions();
    if (typeof calls === "string") {
      $("status").textContent = calls;
      return;
    }
    state.busy = true;
    if (!state.offline) hideBanner();
    refresh();
    $("status").textContent = "Saving…";
    try {
      for (const [path, body] of calls) await api("POST", path, body);
      forgetNonce(state.task.task_id);
      state.session.labelled += 1;
      saveSession();
      $("status").textContent = "Saved";
      await loadNext();
    } catch (err) {
      if (err instanceof ApiError && err.status === 409) {
        // the same key was stored with a different answer: this task is already labelled
        forgetNonce(state.task.task_id);
        state.session.labelled += 1;
        saveSession();
        showBanner("You had already labelled this task; your first answer was kept.", false);
        await loadNext();
      } else if (err instanceof ApiError && err.status === 400) {
        $("status").textContent = `Not saved: ${err.message}`;
      } else {
        $("status").textContent = "Not saved.";
        showBanner(describe(err), isOutage(err));
        if (isAuthError(err)) showLogin(); // the lease keeps the task for after the key
      }
    } finally {
      state.busy = false;
      refresh();
    }
  }

  async function skip() {
    if (state.busy || !state.task) return;
    state.busy = true;
    refresh();
    try {
      await api("POST", `tasks/${state.task.task_id}/skip`, { annotator_id: state.annotator });
      state.session.skipped += 1;
      saveSession();
      await loadNext();
    } catch (err) {
      showBanner(describe(err), isOutage(err));
      if (isAuthError(err)) showLogin();
    } finally {
      state.busy = false;
      refresh();
    }
  }

  // -- drawing state ------------------------------------------------------------------------------
  function refresh() {
    renderProgress();
    if (!state.task) return;
    const n = state.task.completions.length;
    $("mode-choose").setAttribute("aria-selected", String(state.mode === "choose"));
    $("mode-rate").setAttribute("aria-selected", String(state.mode === "rate"));
    $("mode-choose").textContent = n === 2 ? "Choose" : "Rank";
    $("instructions").textContent = instructions(n);
    const each = askingEach();
    $("questions").hidden = !each;
    document.querySelectorAll(".question").forEach((set, number) => {
      const current = each && number === state.question;
      set.classList.toggle("current", current);
      if (current) set.setAttribute("aria-current", "true");
      else set.removeAttribute("aria-current");
      const picked = state.answers.get(set.dataset.criterion);
      for (const button of set.querySelectorAll("button.answer")) {
        const on = picked === Number(button.dataset.index);
        button.classList.toggle("on", on);
        button.setAttribute("aria-checked", String(on));
        button.disabled = state.busy;
      }
    });
    for (const card of document.querySelectorAll(".completion")) {
      const index = Number(card.dataset.index);
      const rank = state.ranking.indexOf(index);
      const badge = card.querySelector(".badge");
      card.classList.toggle("focused", state.focus === index && state.mode === "rate");
      card.classList.toggle("chosen", state.mode === "choose" && state.editing === null &&
        (state.chosen === index || rank === 0));
      card.classList.toggle("rejected", state.mode === "choose" && n === 2 &&
        state.chosen !== null && state.chosen !== index && state.editing === null);
      card.classList.toggle("is-editing", state.editing === index);
      if (state.editing === index) badge.textContent = "Correction";
      else if (each) {
        const wins = state.criteria.filter(({ criterion }) => state.answers.get(criterion) === index);
        badge.textContent = wins.length ? `Preferred: ${wins.map((c) => c.criterion).join(", ")}` : "";
      }
      else if (state.mode === "choose" && n === 2 && state.chosen === index) {
        badge.textContent = "Preferred";
      } else if (state.mode === "choose" && rank >= 0) badge.textContent = `#${rank + 1}`;
      else if (state.mode === "rate" && state.ratings.has(index)) {
        badge.textContent = `${state.ratings.get(index)} / ${RATING_SCALE[1]}`;
      } else badge.textContent = "";
      for (const button of card.querySelectorAll("button.score")) {
        const on = state.ratings.get(index) === Number(button.dataset.score);
        button.classList.toggle("on", on);
        button.setAttribute("aria-checked", String(on));
      }
    }
    $("submit").disabled = state.busy;
    $("skip").disabled = state.busy;
  }

  function instructions(n) {
    if (state.editing !== null) {
      return "Edit the response into what it should have said; Submit stores your correction.";
    }
    if (state.mode === "rate") return "Rate every response from 1 (bad) to 5 (excellent).";
    if (n === 2 && state.criteria.length > 1) {
      return "Answer each question below (press 1 / 2 for the highlighted one, ↑ / ↓ to move " +
        "between them); questions left unanswered are not stored.";
    }
    if (n === 2) return `${state.criteria[0].question} Click it, or press 1 / 2.`;
    return "Click the responses best first (or press their numbers); the last ranks itself.";
  }

  function renderProgress() {
    const { labelled, skipped } = state.session;
    const parts = [`${labelled} labelled`];
    if (skipped) parts.push(`${skipped} skipped`);
    let share = 0;
    if (state.queue) {
      parts.push(`${state.queue.pending} in the queue`);
      share = labelled / Math.max(1, labelled + state.queue.pending);
    }
    $("progress-text").textContent = `This session: ${parts.join(" · ")}`;
    $("progress-fill").style.width = `${Math.round(share * 100)}%`;
  }

  // -- keyboard -----------------------------------------------------------------------------------
  function onKey(event) {
    if (!$("login").hidden || !state.task) return;
    const typing = event.target.closest("textarea, input");
    if (typing) {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        submit();
      } else if (event.key === "Escape") {
        if (event.target.classList.contains("editing")) cancelEdit();
        else event.target.blur();
      }
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const n = state.task.completions.length;
    const digit = Number(event.key);
    if (Number.isInteger(digit) && digit >= 1 && event.key.length === 1) {
      if (askingEach()) {
        if (digit <= 2) answer(state.question, digit - 1, true);
      } else if (state.mode === "rate") {
        if (digit <= RATING_SCALE[1]) rate(state.focus, digit);
      } else if (digit <= n) {
        if (n === 2) choose(digit - 1);
        else toggleRank(digit - 1);
      }
      event.preventDefault();
      return;
    }
    switch (event.key) {
      case "ArrowLeft":
      case "ArrowRight": {
        const delta = event.key === "ArrowLeft" ? -1 : 1;
        if (askingEach()) {
          state.answers.set(state.criteria[state.question].criterion, delta < 0 ? 0 : 1);
          refresh();
        } else if (state.mode === "choose" && n === 2) {
          state.chosen = delta < 0 ? 0 : 1;
          refresh();
        } else moveFocus(delta);
        break;
      }
      case "ArrowUp":
      case "ArrowDown":
        if (!askingEach()) return;
        moveQuestion(event.key === "ArrowUp" ? -1 : 1);
        break;
      case "Enter":
        submit();
        break;
      case "e":
        startEdit(state.mode === "choose" && n === 2 && state.chosen !== null
          ? state.chosen : state.focus);
        break;
      case "s":
        skip();
        break;
      case "r":
        setMode(state.mode === "rate" ? "choose" : "rate");
        break;
      case "c":
        $("comment").focus();
        break;
      case "Escape":
        clearChoice();
        break;
      default:
        return;
    }
    event.preventDefault(); // also keeps Enter from clicking a focused button a second time
  }

  // -- start --------------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", login);
    $("change-annotator").addEventListener("click", showLogin);
    $("submit").addEventListener("click", submit);
    $("skip").addEventListener("click", skip);
    $("check-again").addEventListener("click", loadNext);
    $("banner-retry").addEventListener("click", retryFromBanner);
    $("mode-choose").addEventListener("click", () => setMode("choose"));
    $("mode-rate").addEventListener("click", () => setMode("rate"));
    document.addEventListener("keydown", onKey);
    if (state.annotator) start();
    else showLogin();
  });
})();
