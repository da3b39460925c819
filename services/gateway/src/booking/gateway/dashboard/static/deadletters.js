// The dead letters of the four services, newest first as the gateway merges them: what each
// is (service, type, error, attempts, when, status), its envelope on demand, and what an admin
// does with one (replay, discard with a reason) or with all the kept ones (replay them all).
// Every action goes through the confirmation dialog.

import { byId, fill, h, timeElement } from "./dom.js";

const PAGE_SIZE = 50;
const SUMMARY_CHARACTERS = 200;

/** The line of an error worth reading first: a trace's last line says what was raised. */
export function errorSummary(error) {
  const lines = String(error || "").split("\n").map((line) => line.trim()).filter(Boolean);
  const line = lines.length ? lines[lines.length - 1] : "no error was recorded";
  return line.length > SUMMARY_CHARACTERS ? `${line.slice(0, SUMMARY_CHARACTERS - 1)}…` : line;
}

function what(d) {
  return d.type || "unreadable message";
}

export class DeadLetters {
  /** api: Api; confirmation: Confirmation; openOrder(id): show an order on the order desk */
  constructor(api, confirmation, openOrder) {
    this.api = api;
    this.confirmation = confirmation;
    this.openOrder = openOrder;
    this.filtersForm = byId("dead-letter-filters");
    this.serviceFilter = byId("dead-letter-service");
    this.list = byId("dead-letter-list");
    this.empty = byId("dead-letters-empty");
    this.more = byId("dead-letters-more");
    this.message = byId("dead-letters-message");
    this.replayAllButton = byId("replay-all");
    this.cursor = null;
    this.pages = 0; // pages shown: past the first, a refresh would lose the admin's place
    this.generation = 0; // a filter change makes answers to earlier requests stale
    this.rows = new Map(); // id -> <li>
    this.loadFailed = false; // the panel's message says a load failed (a later load clears it)

    this.filtersForm.addEventListener("change", () => {
      this.labelReplayAll();
      this.reset();
    });
    this.filtersForm.addEventListener("submit", (event) => event.preventDefault());
    byId("dead-letters-refresh").addEventListener("click", () => this.reset());
    this.replayAllButton.addEventListener("click", () => this.replayAll());
    this.more.addEventListener("click", () => this.loadMore());
    this.labelReplayAll();
  }

  filters() {
    const data = new FormData(this.filtersForm);
    return { service: data.get("service") || "", status: data.get("status") || "" };
  }

  labelReplayAll() {
    const { service } = this.filters();
    this.replayAllButton.textContent = service ? `Replay all kept (${service})` : "Replay all kept";
  }

  report(text) {
    this.message.textContent = text;
  }

  /** The first page again, with the filters as they are. */
  async reset() {
    this.generation += 1;
    this.cursor = null;
    this.pages = 0;
    await this.loadPage(null);
  }

  /** Something changed (a new dead letter was reported, the feed came back): the first page
   * again, unless the admin has paged on, where it would lose their place. */
  async refresh() {
    if (this.pages > 1) {
      this.report("There may be new dead letters: Refresh to see them.");
      this.loadFailed = true; // cleared by the next load
      return;
    }
    await this.reset();
  }

  async loadMore() {
    if (!this.cursor) return;
    this.more.disabled = true;
    try {
      await this.loadPage(this.cursor);
    } finally {
      this.more.disabled = false;
    }
  }

  async loadPage(cursor) {
    const generation = this.generation;
    let page;
    try {
      page = await this.api.deadLetters(this.filters(), { cursor, limit: PAGE_SIZE });
    } catch (error) {
      if (generation === this.generation) {
        this.report(`Could not load the dead letters: ${error.message}`);
        this.loadFailed = true;
      }
      return;
    }
    if (generation !== this.generation) return;
    const rows = page.items.map((d) => this.rowFor(d));
    const focused = this.list.contains(document.activeElement) ? document.activeElement : null;
    if (cursor === null) {
      const kept = new Set(page.items.map((d) => d.id));
      for (const id of this.rows.keys()) if (!kept.has(id)) this.rows.delete(id);
      fill(this.list, rows);
    } else {
      this.list.append(...rows);
    }
    focused?.focus();
    this.pages += 1;
    this.cursor = page.next_cursor;
    this.more.hidden = !this.cursor;
    this.empty.hidden = this.list.children.length > 0;
    if (this.loadFailed) {
      this.loadFailed = false;
      this.report(""); // what an action said stays
    }
  }

  /** The row of `d`: the one shown when nothing about it changed (its details stay open). */
  rowFor(d) {
    const shown = this.rows.get(d.id);
    if (shown && shown.dataset.fingerprint === fingerprint(d)) return shown;
    const row = this.render(d);
    this.rows.set(d.id, row);
    return row;
  }

  /** `d` changed here (replayed, discarded): its row redrawn in place. */
  update(d) {
    const row = this.render(d);
    const previous = this.rows.get(d.id);
    this.rows.set(d.id, row);
    if (previous?.isConnected) {
      const open = previous.querySelector("details")?.open;
      previous.replaceWith(row);
      if (open) this.openDetails(row, d);
    }
    return row;
  }

  render(d) {
    const title = `${d.id} (${what(d)})`;
    const details = h(
      "details",
      { class: "envelope" },
      h("summary", {}, "Envelope and error"),
      h("div", { class: "detail-body" }, h("p", { class: "note" }, "Loading…")),
    );
    details.addEventListener("toggle", () => {
      if (details.open && !details.dataset.loaded) this.loadDetail(details, d.id);
    });
    return h(
      "li",
      {
        class: `dead-letter dl-${d.status}`,
        dataset: { id: d.id, service: d.service, status: d.status, fingerprint: fingerprint(d) },
      },
      h(
        "div",
        { class: "line" },
        h("span", { class: "badge service" }, d.service),
        h("span", { class: "type" }, what(d)),
        h("span", { class: `state dl-state dl-${d.status}` }, d.status),
      ),
      h("p", { class: "text error-summary" }, errorSummary(d.error)),
      h(
        "p",
        { class: "when" },
        "Dead-lettered ",
        timeElement(d.dead_lettered_at),
        ` · ${d.attempts} attempt${d.attempts === 1 ? "" : "s"} · ${d.id}`,
      ),
      details,
      d.status === "kept"
        ? h(
            "div",
            { class: "actions" },
            h(
              "button",
              {
                type: "button",
                dataset: { action: "replay" },
                "aria-label": `Replay ${title}`,
                onclick: () => this.replay(d),
              },
              "Replay",
            ),
            h(
              "button",
              {
                type: "button",
                class: "danger",
                dataset: { action: "discard" },
                "aria-label": `Discard ${title}`,
                onclick: () => this.discard(d),
              },
              "Discard",
            ),
          )
        : null,
    );
  }

  openDetails(row, d) {
    const details = row.querySelector("details");
    details.open = true;
    this.loadDetail(details, d.id);
  }

  async loadDetail(details, id) {
    const body = details.querySelector(".detail-body");
    let d;
    try {
      d = await this.api.deadLetter(id);
    } catch (error) {
      fill(body, h("p", { class: "message" }, `Could not load ${id}: ${error.message}`));
      return;
    }
    details.dataset.loaded = "true";
    const facts = [
      ["consumer", d.consumer],
      ["reason", d.reason],
      ["routing key", d.routing_key],
      ["message id", d.message_id],
      ["replayed at", d.replayed_at ? timeElement(d.replayed_at) : null],
      ["discarded at", d.discarded_at ? timeElement(d.discarded_at) : null],
      ["decided by", d.decided_by],
      ["why", d.decision_reason],
    ].filter(([, value]) => value !== null && value !== undefined && value !== "");
    const orderId = d.envelope?.payload?.order_id;
    fill(
      body,
      h("dl", {}, facts.map(([key, value]) => [h("dt", {}, key), h("dd", {}, value)])),
      h("h4", {}, "Error"),
      h("pre", { class: "error" }, d.error),
      d.envelope
        ? [h("h4", {}, "Envelope"), h("pre", { class: "envelope-json" }, JSON.stringify(d.envelope, null, 2))]
        : [h("h4", {}, "Body (not a readable envelope)"), h("pre", { class: "raw-body" }, d.body ?? "")],
      typeof orderId === "string" && this.openOrder
        ? h(
            "div",
            { class: "actions" },
            h("button", { type: "button", onclick: () => this.openOrder(orderId) }, "Open its order"),
          )
        : null,
    );
  }

  async replay(d) {
    const done = await this.confirmation.ask({
      title: `Replay dead letter ${d.id}?`,
      text:
        `Its message (${what(d)}) goes back to its consumer's queue in ${d.service}, once. ` +
        "A message whose effects were already applied changes nothing the second time.",
      confirm: "Replay",
      reason: "optional",
      run: ({ reason }) => this.api.replayDeadLetter(d.id, reason),
    });
    if (!done) return;
    this.update(done).querySelector("summary")?.focus();
    this.report(`${d.id} replayed: sent back to its consumer.`);
  }

  async discard(d) {
    const done = await this.confirmation.ask({
      title: `Discard dead letter ${d.id}?`,
      text: `Its message (${what(d)}) will never be handled. The reason is kept with who and when.`,
      confirm: "Discard",
      danger: true,
      reason: "required",
      run: ({ reason }) => this.api.discardDeadLetter(d.id, reason),
    });
    if (!done) return;
    this.update(done).querySelector("summary")?.focus();
    this.report(`${d.id} discarded.`);
  }

  async replayAll() {
    const { service } = this.filters();
    const where = service ? `of ${service}` : "of every service";
    const done = await this.confirmation.ask({
      title: `Replay every kept dead letter ${where}?`,
      text:
        "Each goes back to its consumer's queue, once; what was already applied changes " +
        "nothing. Those that fail again come back here as kept.",
      confirm: "Replay all",
      run: () => this.api.replayAllDeadLetters(service),
    });
    if (!done) return;
    await this.reset();
    this.report(`${done.replayed} replayed.`);
  }

  clear() {
    this.generation += 1;
    this.loadFailed = false;
    this.rows.clear();
    fill(this.list);
    this.cursor = null;
    this.pages = 0;
    this.more.hidden = true;
    this.empty.hidden = true;
    this.report("");
  }
}

function fingerprint(d) {
  return `${d.status}|${d.dead_lettered_at}|${d.attempts}`;
}
