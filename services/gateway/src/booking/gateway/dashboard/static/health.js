// Every component's health from the gateway's /api/admin/health (application/health+json, checks
// keyed "component:measurement", each a list of observations), refreshed on an interval. The
// public /health says only the overall status: the checks are for admins.

import { byId, fill, h, timeElement } from "./dom.js";

export const HEALTH_EVERY_MS = 5_000;
const RANK = { pass: 0, warn: 1, fail: 2 };
const STATUSES = ["pass", "warn", "fail"];

function observedText(entry) {
  if (entry.observedValue === undefined || entry.observedValue === null) return null;
  const value = typeof entry.observedValue === "object" ? JSON.stringify(entry.observedValue) : entry.observedValue;
  return entry.observedUnit ? `${value} ${entry.observedUnit}` : String(value);
}

function tile(key, entries) {
  const list = Array.isArray(entries) ? entries : [entries];
  const status = STATUSES[rank(list)];
  const [component, measurement] = key.split(":");
  return h(
    "li",
    { class: `check status-${status}`, dataset: { key, status } },
    h(
      "div",
      { class: "check-head" },
      h("span", { class: "component" }, component),
      measurement ? h("span", { class: "measurement" }, measurement) : null,
      h("span", { class: `badge status-${status}` }, status === "fail" ? "FAILING" : status),
    ),
    list.map((entry) => {
      const observed = observedText(entry || {});
      return h(
        "p",
        { class: "observation" },
        observed ? h("span", { class: "observed" }, observed) : null,
        entry?.output ? h("span", { class: "output" }, entry.output) : null,
      );
    }),
  );
}

export class HealthGrid {
  /** api: the signed-in admin's Api (a refused token signs out, as on every call). */
  constructor(api) {
    this.api = api;
    this.grid = byId("health-grid");
    this.overall = byId("health-overall");
    this.note = byId("health-note");
    this.pill = byId("health-pill"); // the header's summary: seen first on a phone
    this.timer = null;
    this.running = false;
  }

  start() {
    if (this.running) return;
    this.running = true;
    this.tick();
  }

  stop() {
    this.running = false;
    clearTimeout(this.timer);
    this.pill.hidden = true;
  }

  async tick() {
    await this.refresh();
    if (this.running) this.timer = setTimeout(() => this.tick(), HEALTH_EVERY_MS);
  }

  async refresh() {
    let report;
    try {
      report = await this.api.health();
    } catch (error) {
      // A refused token has signed out (and stopped the grid) meanwhile: nothing to show.
      if (!this.running) return;
      this.show("fail", [tile("gateway:reachable", [{ status: "fail", output: error.message }])]);
      return;
    }
    if (!this.running) return;
    const checks = Object.entries(report.checks || {});
    // Failing first, then warnings: what needs a look is at the top.
    checks.sort(([, a], [, b]) => rank(b) - rank(a));
    this.show(report.status in RANK ? report.status : "fail", checks.map(([key, entries]) => tile(key, entries)));
  }

  show(status, tiles) {
    this.overall.className = `badge status-${status}`;
    this.overall.textContent = status === "fail" ? "FAILING" : status;
    this.overall.dataset.status = status;
    fill(this.grid, tiles);
    const failing = tiles.filter((t) => t.dataset.status === "fail").map((t) => t.dataset.key);
    this.pill.className = `badge pill status-${status}`;
    this.pill.dataset.status = status;
    this.pill.textContent = failing.length
      ? `Health: ${failing.length} failing`
      : `Health: ${status}`;
    this.pill.hidden = false;
    fill(
      this.note,
      failing.length ? `Failing: ${failing.join(", ")}. ` : "",
      "Checked ",
      timeElement(new Date().toISOString()),
      ` · every ${HEALTH_EVERY_MS / 1000} s`,
    );
  }
}

/** The worst status among a check's observations (anything unreadable counts as fail). */
function rank(entries) {
  const list = Array.isArray(entries) ? entries : [entries];
  return Math.max(0, ...list.map((e) => RANK[e?.status] ?? 2));
}
