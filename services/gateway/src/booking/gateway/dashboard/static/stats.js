// Unread counts per severity, and the last 7 days as stacked bars (CSS, no library).

import { byId, fill, h } from "./dom.js";

export const SEVERITIES = ["Critical", "Error", "Warning", "Info"];
const COUNT_LIMIT = 200; // the API's largest page: beyond it the count reads "200+"
const DAYS = 7;

const weekday = new Intl.DateTimeFormat(undefined, { weekday: "short", timeZone: "UTC" });
const fullDay = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeZone: "UTC" });

export class Stats {
  constructor(api, report) {
    this.api = api;
    this.report = report;
    this.counts = byId("unread-counts");
    this.chart = byId("summary-chart");
    this.pending = null;
    this.running = false;
    this.again = false;
  }

  /** Refresh soon; many changes in a burst make one refresh. */
  soon(delay = 300) {
    if (this.pending) return;
    this.pending = setTimeout(() => {
      this.pending = null;
      this.refresh();
    }, delay);
  }

  async refresh() {
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = true;
    try {
      const done = await Promise.all([this.refreshCounts(), this.refreshSummary()]);
      if (done.every(Boolean)) this.report(""); // what went wrong before is over
    } finally {
      this.running = false;
      if (this.again) {
        this.again = false;
        this.soon(0);
      }
    }
  }

  async refreshCounts() {
    let pages;
    try {
      pages = await Promise.all(
        SEVERITIES.map((severity) =>
          this.api.notifications({ unreadOnly: true, severity }, { limit: COUNT_LIMIT }),
        ),
      );
    } catch (error) {
      this.report(`Could not count the unread notifications: ${error.message}`);
      return false;
    }
    const items = SEVERITIES.map((severity, i) => {
      const page = pages[i];
      const count = page.items.length;
      const text = page.next_cursor ? `${count}+` : String(count);
      return h(
        "li",
        { class: `count sev-${severity}${count ? "" : " zero"}`, dataset: { severity, count: text } },
        h("span", { class: "number" }, text),
        h("span", { class: "label" }, severity),
      );
    });
    fill(this.counts, items);
    return true;
  }

  async refreshSummary() {
    let summary;
    try {
      summary = await this.api.summary(DAYS);
    } catch (error) {
      this.report(`Could not load the 7-day summary: ${error.message}`);
      return false;
    }
    const byDay = new Map();
    for (const { day, severity, count } of summary.counts) {
      if (!byDay.has(day)) byDay.set(day, Object.fromEntries(SEVERITIES.map((s) => [s, 0])));
      byDay.get(day)[severity] = count;
    }
    const days = [...byDay.keys()].sort();
    const totals = days.map((day) => SEVERITIES.reduce((sum, s) => sum + byDay.get(day)[s], 0));
    const top = Math.max(1, ...totals);
    const bars = days.map((day, i) => {
      const date = new Date(`${day}T00:00:00Z`);
      const counts = byDay.get(day);
      const said = SEVERITIES.filter((s) => counts[s]).map((s) => `${counts[s]} ${s}`);
      const label = `${fullDay.format(date)}: ${totals[i]} raised${said.length ? ` (${said.join(", ")})` : ""}`;
      const stack = h("div", { class: "stack" });
      for (const severity of [...SEVERITIES].reverse()) {
        if (!counts[severity]) continue;
        const segment = h("div", { class: `segment sev-${severity}`, title: `${counts[severity]} ${severity}` });
        segment.style.setProperty("height", `${(100 * counts[severity]) / top}%`);
        stack.append(segment);
      }
      return h(
        "figure",
        { class: "bar", role: "img", "aria-label": label, title: label, dataset: { day, total: totals[i] } },
        h("span", { class: "total" }, String(totals[i])),
        stack,
        h("figcaption", {}, weekday.format(date)),
      );
    });
    fill(this.chart, bars);
    return true;
  }

  clear() {
    clearTimeout(this.pending);
    this.pending = null;
    fill(this.counts);
    fill(this.chart);
  }
}
