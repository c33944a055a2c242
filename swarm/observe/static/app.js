// The status page: polls /api/status and draws it. No framework, no build step, no outside asset.
"use strict";

const POLL_MS = 1000;
const errors = [];
let polls = 0;

function report(message) {
  // every script error is shown on the page (and counted in body[data-errors]) as well as in the console
  errors.push(String(message));
  const box = document.getElementById("errors");
  box.textContent = errors.join("\n");
  box.hidden = false;
  document.body.dataset.errors = String(errors.length);
}
window.addEventListener("error", (event) => report(event.message));
window.addEventListener("unhandledrejection", (event) => report(event.reason));

function $(id) { return document.getElementById(id); }
function short(peerId) { return peerId ? "…" + peerId.slice(-6) : "-"; }
function fixed(value, digits) { return value === null || value === undefined ? "-" : Number(value).toFixed(digits); }
function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}
function svg(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.round(seconds);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function drawCurves(train, evals) {
  const W = 800, H = 300, L = 50, R = 15, T = 15, B = 30;
  const all = train.concat(evals);
  const axes = $("axes");
  axes.replaceChildren();
  $("eval-points").replaceChildren();
  if (all.length === 0) {
    $("train-curve").setAttribute("d", "");
    $("eval-curve").setAttribute("d", "");
    axes.appendChild(svg("text", { x: W / 2 - 60, y: H / 2 }, "no loss reported yet"));
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(x0 + 1, ...xs);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-6) { y0 -= 0.5; y1 += 0.5; }
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    axes.appendChild(svg("line", { x1: L, x2: W - R, y1: py(y), y2: py(y) }));
    axes.appendChild(svg("text", { x: 4, y: py(y) + 4 }, y.toFixed(2)));
  }
  for (let i = 0; i <= 4; i++) {
    const x = x0 + ((x1 - x0) * i) / 4;
    axes.appendChild(svg("text", { x: px(x) - 8, y: H - 8 }, String(Math.round(x))));
  }
  const path = (points) => points.map((p, i) => (i ? "L" : "M") + px(p[0]).toFixed(1) + " " + py(p[1]).toFixed(1)).join(" ");
  $("train-curve").setAttribute("d", path(train));
  $("eval-curve").setAttribute("d", path(evals));
  for (const p of evals) $("eval-points").appendChild(svg("circle", { cx: px(p[0]), cy: py(p[1]), r: 3 }));
  $("curves").dataset.trainPoints = String(train.length);
  $("curves").dataset.evalPoints = String(evals.length);
}

function peerCell(peer) {
  const span = el("span", { class: "peer", title: peer.peer_id + (peer.rtt_ms !== null ? " · " + peer.rtt_ms + " ms" : "") });
  const state = peer.reachable === null ? "" : peer.reachable ? " up" : " down";
  span.appendChild(el("span", { class: "dot" + state }));
  span.appendChild(document.createTextNode(short(peer.peer_id)));
  return span;
}

function drawStages(stages, others) {
  const body = $("stages").querySelector("tbody");
  body.replaceChildren();
  for (const stage of stages) {
    const row = el("tr", { class: "stage-row", "data-stage": String(stage.stage) });
    row.appendChild(el("td", {}, String(stage.stage)));
    row.appendChild(el("td", {}, String(stage.peers.length)));
    row.appendChild(el("td", {}, stage.reachable + "/" + stage.peers.length));
    row.appendChild(el("td", {}, stage.step === null ? "-" : String(stage.step)));
    row.appendChild(el("td", {}, fixed(stage.throughput, 1)));
    const ids = el("td");
    if (stage.peers.length === 0) ids.textContent = "no peer: waiting for one";
    for (const peer of stage.peers) ids.appendChild(peerCell(peer));
    row.appendChild(ids);
    body.appendChild(row);
  }
  const box = $("others");
  box.replaceChildren();
  if (others.length) {
    box.appendChild(document.createTextNode("trainers and validators: "));
    for (const peer of others) box.appendChild(peerCell(peer));
  }
}

function drawAttestations(attestations, flagged) {
  const body = $("attestations").querySelector("tbody");
  body.replaceChildren();
  if (attestations.length === 0) {
    const row = el("tr");
    row.appendChild(el("td", { colspan: "3" }, "none yet"));
    body.appendChild(row);
  }
  for (const att of attestations) {
    const row = el("tr", { class: "attestation-row" });
    row.appendChild(el("td", {}, String(att.window)));
    row.appendChild(el("td", {}, short(att.orchestrator)));
    row.appendChild(el("td", {}, att.shares.map((s) => short(s.peer_id) + " " + (100 * s.share).toFixed(1) + "%").join(", ")));
    body.appendChild(row);
  }
  const list = $("flagged");
  list.replaceChildren();
  if (flagged.length === 0) list.appendChild(el("li", {}, "none"));
  for (const f of flagged) {
    const how = f.by + (f.windows.length ? " (windows " + f.windows.join(", ") + ")" : "");
    list.appendChild(el("li", { class: "flagged-peer" }, short(f.peer_id) + ": " + how));
  }
}

function draw(status) {
  const node = status.node;
  $("run-name").textContent = status.run ? status.run.name + " · run " + status.run.run_id.slice(0, 12) : "(no run)";
  $("node-id").textContent = short(node.peer_id);
  $("node-role").textContent = node.role + (node.stage === null ? "" : " of stage " + node.stage);
  const health = node.health;
  $("health").textContent = health.status + (health.reasons.length ? ": " + health.reasons.join("; ") : "");
  $("health").className = "badge " + (health.status === "ok" ? "ok" : "bad");
  const step = status.step === null ? "-" : String(status.step);
  $("step").textContent = status.max_steps ? step + " / " + status.max_steps : step;
  $("progress").max = status.max_steps || 1;
  $("progress").value = status.step || 0;
  document.body.dataset.step = step;
  const last = (curve) => (curve.length ? curve[curve.length - 1][1] : null);
  $("loss").textContent = fixed(last(status.loss_curve), 3);
  $("eval-loss").textContent = fixed(last(status.eval_curve), 3);
  $("samples-per-s").textContent = fixed(status.samples_per_s, 1);
  $("tokens-per-s").textContent = fixed(status.tokens_per_s, 0);
  $("eta").textContent = status.max_steps && status.step >= status.max_steps ? "done" : duration(status.eta_s);
  drawCurves(status.loss_curve, status.eval_curve);
  drawStages(status.stages, status.others);
  drawAttestations(status.attestations, status.flagged);
  $("updated").textContent = new Date(status.time * 1000).toLocaleTimeString();
}

async function poll() {
  setTimeout(poll, POLL_MS);
  let status;
  try {
    const response = await fetch("/api/status", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    status = await response.json();
  } catch (error) {
    $("offline").hidden = false;  // the node stopped or is restarting: keep polling, no console error
    return;
  }
  $("offline").hidden = true;
  draw(status);  // an error here is a bug: it reaches the console and the page (report)
  if (polls === 0) document.body.dataset.firstDrawMs = String(Math.round(performance.now()));  // load to first draw
  polls += 1;
  document.body.dataset.polls = String(polls);
  $("polls").textContent = String(polls);
}

poll();
