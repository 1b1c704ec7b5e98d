// The secret-broker dashboard: one small ES module, no dependencies, no build step.
//
// The rules it keeps: the DOM is written with textContent only; the session
// token lives in this tab's sessionStorage and travels as `Authorization: Bearer` (no
// cookies); a secret typed into a form is sent once and never rendered, kept or stored:
// its input is cleared as the request leaves.

const TOKEN_KEY = "secret-broker.session";
const SVG = "http://www.w3.org/2000/svg";
const $ = (selector) => document.querySelector(selector);
const tabs = [...document.querySelectorAll('[role="tab"]')];

let token = sessionStorage.getItem(TOKEN_KEY);

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// --- talking to the broker -----------------------------------------------------------------

async function call(method, path, body) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method, headers, credentials: "omit", cache: "no-store", redirect: "error" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(`/ui/api/${path}`, init);
  const doc = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new ApiError(response.status, doc.error?.message ?? `HTTP ${response.status}`);
  }
  return doc;
}

// Runs one user action; its result (a sentence) or its error goes to the notice line.
async function run(action) {
  try {
    say(await action(), false);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      signOut("Your session has ended (15 minutes unused, or 8 hours after it began).");
    } else {
      say(error.message, true);
    }
  }
}

function say(text, isError) {
  const notice = $("#notice");
  notice.textContent = text ?? "";
  notice.classList.toggle("error", isError);
}

// --- building the page (textContent only) --------------------------------------------------

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function button(label, onClick, className, name) {
  const node = el("button", label, className);
  node.type = "button";
  if (name) node.setAttribute("aria-label", name);
  node.addEventListener("click", onClick);
  return node;
}

function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function when(ts) {
  return ts ? ts.replace("T", " ").replace(/\.\d+Z$/, "Z") : null;
}

function ref(name) {
  return name ? `@${name}` : null;
}

// Fills a table's body: one row per item, `cells(item)` its values, `actions(item)` buttons.
function fill(tableId, items, cells, actions) {
  const width = $(`#${tableId} thead tr`).children.length;
  const rows = items.map((item) => {
    const tr = el("tr");
    for (const value of cells(item)) tr.append(el("td", value ?? "–"));
    if (actions) {
      const td = el("td", null, "actions");
      td.append(...actions(item));
      tr.append(td);
    }
    return tr;
  });
  if (!rows.length) {
    const td = el("td", "Nothing here yet.", "empty");
    td.colSpan = width;
    rows.push(el("tr"));
    rows[0].append(td);
  }
  $(`#${tableId} tbody`).replaceChildren(...rows);
}

function facts(selector, pairs) {
  const list = $(selector);
  list.replaceChildren();
  for (const [term, value, className] of pairs) {
    if (value === null || value === undefined) continue;
    list.append(el("dt", term), el("dd", value, className));
  }
}

function field(form, name) {
  return form.elements.namedItem(name);
}

// The optional text fields of a form that were filled in, trimmed.
function filled(form, names) {
  const out = {};
  for (const name of names) {
    const value = field(form, name).value.trim();
    if (value) out[name] = value;
  }
  return out;
}

function confirmed(text, label) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  $("#confirm-ok").textContent = label;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

function onSubmit(selector, action) {
  $(selector).addEventListener("submit", (event) => {
    event.preventDefault();
    run(() => action(event.currentTarget));
  });
}

// --- the sections ----------------------------------------------------------------------------

const loaders = {
  async secrets() {
    const { secrets } = await call("GET", "secrets");
    fill("secrets-table", secrets,
      (s) => [ref(s.ref), s.provider, s.kind, s.backend, s.fingerprint, s.version,
        when(s.created_at), when(s.rotated_at), when(s.last_used_at)],
      (s) => (s.read_only ? [el("span", "read-only: `team set` in its repository")] : [
        button("Rotate…", () => pickForRotation(s.ref), "", `Rotate @${s.ref}`),
        button("Remove", () => removeSecret(s.ref), "danger", `Remove @${s.ref}`)]));
    const select = field($("#rotate-form"), "ref");
    const chosen = select.value;
    select.replaceChildren(...secrets.filter((s) => !s.read_only).map((s) => {
      const option = el("option", ref(s.ref));
      option.value = s.ref;
      return option;
    }));
    if (secrets.some((s) => s.ref === chosen)) select.value = chosen;
  },

  async grants() {
    const doc = await call("GET", "grants");
    facts("#grants-file", [
      ["File", doc.file],
      ["State", doc.valid ? "valid" : "invalid: every request is denied", doc.valid ? "ok" : "bad"],
      ["Error", doc.error, "bad"],
      ["Loaded", when(doc.loaded_at)],
      ["Grants", doc.grants.length],
    ]);
    fill("grants-table", doc.grants,
      (g) => [g.index, g.line, ref(g.secret_ref), g.consumer, g.purposes.join(", "),
        g.delivery.join(", "), g.allowed_hosts.join(", "), g.ttl_secs]);
  },

  async leases() {
    const { leases } = await call("GET", "leases");
    fill("leases-table", leases,
      (l) => [l.lease_id, l.consumer, ref(l.secret_ref), l.purpose, l.delivery, l.host,
        when(l.expires_at)],
      (l) => [button("Revoke", () => revokeLease(l.lease_id), "danger", `Revoke ${l.lease_id}`)]);
  },

  async tokens() {
    const { tokens } = await call("GET", "tokens");
    fill("tokens-table", tokens,
      (t) => [t.id, t.consumer, t.description, when(t.created_at), when(t.expires_at),
        when(t.last_used_at), t.daily_tokens, when(t.revoked_at)],
      (t) => (t.revoked_at ? [] : [button("Revoke", () => revokeToken(t), "danger",
        `Revoke ${t.id}`)]));
  },

  async audit() {
    const form = $("#audit-form");
    const wanted = filled(form, ["ref", "event"]);
    if (wanted.ref) wanted.ref = wanted.ref.replace(/^@/, "");
    const query = new URLSearchParams({ ...wanted, limit: "200" });
    const [{ events }, verdict] = await Promise.all([
      call("GET", `audit?${query}`), call("GET", "audit/verify")]);
    const line = $("#audit-verify");
    line.textContent = verdict.ok
      ? `Hash chain verified: ${verdict.checked} lines, intact.`
      : `Hash chain broken at line ${verdict.first_bad_line}: ${verdict.reason}`;
    line.className = `verdict ${verdict.ok ? "ok" : "bad"}`;
    const shown = new Set(["ts", "seq", "event", "actor", "secret_ref", "consumer", "prev", "mac"]);
    fill("audit-table", events.reverse(),
      (e) => [e.seq, when(e.ts), e.event, e.actor, ref(e.secret_ref), e.consumer,
        Object.entries(e).filter(([key]) => !shown.has(key))
          .map(([key, value]) => `${key}=${value}`).join(" ")]);
  },

  async usage() {
    const form = $("#usage-form");
    const query = new URLSearchParams({ group_by: "consumer,provider", ...filled(form, ["since"]) });
    const { usage } = await call("GET", `usage?${query}`);
    const tokens = field(form, "measure").value === "tokens";
    chart(usage.map((r) => ({
      label: `${r.consumer} · ${r.provider}`,
      value: tokens ? (r.input_tokens ?? 0) + (r.output_tokens ?? 0) : r.requests,
    })), tokens ? "tokens" : "requests");
    fill("usage-table", usage,
      (r) => [r.consumer, r.provider, r.requests, r.errors, r.input_tokens, r.output_tokens]);
  },
};

// Horizontal bars in an inline SVG: a label line above each bar, the amount after it.
function chart(bars, unit) {
  const box = $("#usage-chart");
  $("#usage-caption").textContent = bars.length
    ? `${unit} per consumer and provider` : "No proxied requests yet.";
  if (!bars.length) {
    box.replaceChildren();
    return;
  }
  bars.sort((a, b) => b.value - a.value);
  const max = Math.max(1, ...bars.map((b) => b.value));
  const row = 44;
  const picture = svg("svg", { width: "100%", height: bars.length * row, role: "img",
    "aria-label": `Usage chart: ${unit} per consumer and provider` });
  bars.forEach((bar, i) => {
    const top = i * row;
    const share = (bar.value / max) * 80;
    picture.append(
      svg("text", { x: 0, y: top + 14, class: "label" }, bar.label),
      svg("rect", { x: 0, y: top + 20, width: `${Math.max(share, 0.5)}%`, height: 16, rx: 3,
        class: "bar" }),
      svg("text", { x: `${share + 1.5}%`, y: top + 33, class: "amount" },
        bar.value.toLocaleString("en")));
  });
  box.replaceChildren(picture);
}

// --- actions ---------------------------------------------------------------------------------

onSubmit("#add-form", async (form) => {
  const body = {
    ref: field(form, "ref").value.trim().replace(/^@/, ""),
    provider: field(form, "provider").value.trim(),
    kind: field(form, "kind").value,
    value: field(form, "value").value,
  };
  field(form, "value").value = ""; // sent once: never rendered, kept or stored
  const meta = await call("POST", "secrets", body);
  form.reset();
  await loaders.secrets();
  return `Added @${meta.ref} (version ${meta.version}).`;
});

onSubmit("#rotate-form", async (form) => {
  const name = field(form, "ref").value;
  const body = { value: field(form, "value").value };
  field(form, "value").value = ""; // sent once: never rendered, kept or stored
  const meta = await call("PUT", `secrets/${encodeURIComponent(name)}`, body);
  await loaders.secrets();
  return `Rotated @${meta.ref}: now version ${meta.version}; leases on the old value ended.`;
});

function pickForRotation(name) {
  const form = $("#rotate-form");
  field(form, "ref").value = name;
  field(form, "value").focus();
}

async function removeSecret(name) {
  if (!(await confirmed(`Remove @${name}? Its value and metadata are deleted and its leases end.`,
    "Remove"))) return;
  await run(async () => {
    await call("DELETE", `secrets/${encodeURIComponent(name)}`);
    await loaders.secrets();
    return `Removed @${name}.`;
  });
}

onSubmit("#explain-form", async (form) => {
  const body = {
    ...filled(form, ["consumer", "secret_ref", "purpose", "host"]),
    delivery: field(form, "delivery").value,
  };
  if (body.secret_ref) body.secret_ref = body.secret_ref.replace(/^@/, "");
  const doc = await call("POST", "grants/explain", body);
  const result = $("#explain-result");
  result.textContent = `${doc.decision}: ${doc.reason}`;
  result.className = `result ${doc.decision === "allow" ? "ok" : "bad"}`;
  return null;
});

async function revokeLease(id) {
  await run(async () => {
    await call("DELETE", `leases/${encodeURIComponent(id)}`);
    await loaders.leases();
    return `Revoked lease ${id}.`;
  });
}

onSubmit("#token-form", async (form) => {
  const body = filled(form, ["consumer", "ttl", "description"]);
  const daily = field(form, "daily_tokens").value;
  if (daily) body.daily_tokens = Number(daily);
  const doc = await call("POST", "tokens", body);
  form.reset();
  $("#new-token-value").textContent = doc.token;
  $("#new-token").hidden = false;
  await loaders.tokens();
  return `Created ${doc.id} for consumer ${doc.consumer}.`;
});

function forgetNewToken() {
  $("#new-token-value").textContent = "";
  $("#new-token").hidden = true;
}

async function revokeToken(t) {
  if (!(await confirmed(`Revoke ${t.id} (consumer ${t.consumer})? It stops working at once.`,
    "Revoke"))) return;
  await run(async () => {
    await call("DELETE", `tokens/${encodeURIComponent(t.id)}`);
    await loaders.tokens();
    return `Revoked ${t.id}.`;
  });
}

onSubmit("#audit-form", () => loaders.audit().then(() => null));
onSubmit("#usage-form", () => loaders.usage().then(() => null));
$("#new-token-done").addEventListener("click", forgetNewToken);
for (const refresh of document.querySelectorAll("button.refresh")) {
  refresh.addEventListener("click", () => run(() => loaders[refresh.dataset.section]()));
}

// --- tabs, sign-in and sign-out ------------------------------------------------------------

function selectTab(tab) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    document.getElementById(t.getAttribute("aria-controls")).hidden = !on;
  }
  forgetNewToken();
  $("#signed-out").hidden = true;
  run(() => loaders[tab.getAttribute("aria-controls")]());
}

tabs.forEach((tab, i) => {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    const next = tabs[(i + step + tabs.length) % tabs.length];
    next.focus();
    selectTab(next);
  });
});

function signOut(reason) {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $("#tabs").hidden = true;
  $("#sign-out").hidden = true;
  for (const t of tabs) document.getElementById(t.getAttribute("aria-controls")).hidden = true;
  forgetNewToken();
  $("#signed-out-reason").textContent = reason;
  $("#signed-out").hidden = false;
  say("", false);
}

$("#sign-out").addEventListener("click", async () => {
  await call("DELETE", "session").catch(() => null);
  signOut("You signed out.");
});

async function start() {
  const code = new URLSearchParams(location.hash.slice(1)).get("code");
  if (code) {
    // The code leaves the address bar and the history before it is used.
    history.replaceState(null, "", location.pathname);
    token = null;
    try {
      token = (await call("POST", "session", { code })).token;
      sessionStorage.setItem(TOKEN_KEY, token);
    } catch (error) {
      signOut(error.status === 401
        ? "That login link was already used, or has expired." : error.message);
      return;
    }
  }
  if (!token) {
    signOut("This tab has no session.");
    return;
  }
  $("#tabs").hidden = false;
  $("#sign-out").hidden = false;
  selectTab(tabs[0]);
}

start();
