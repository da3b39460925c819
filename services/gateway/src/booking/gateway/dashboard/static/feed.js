// The notifications list: newest first (by id), one row per notification id, whatever route it
// came by (a page of the API, a live frame, a replay): a second arrival updates its row.

import { byId, fill, h, timeElement } from "./dom.js";

/** The merge of two states of one notification: a live frame and a page may cross. */
function merged(old, incoming) {
  if (!old) return incoming;
  const next = { ...old, ...incoming };
  if (old.occurrences > incoming.occurrences) {
    // An older snapshot (a page fetched before the live count-up arrived): keep the count.
    next.occurrences = old.occurrences;
    next.last_occurred_at = old.last_occurred_at;
    next.message = old.message;
  }
  if (old.is_read && !incoming.is_read && old.occurrences >= incoming.occurrences) {
    next.is_read = true; // marked read here after that snapshot was taken
    next.read_at = old.read_at;
  }
  return next;
}

export class Feed {
  /**
   * api: Api; changed(): the counts may have changed; report(text): a line for the admin;
   * openOrder(id): show an order on the order desk (a notification about one offers it)
   */
  constructor(api, changed, report, pageSize = 50, openOrder = null) {
    this.api = api;
    this.pageSize = pageSize;
    this.changed = changed;
    this.report = report;
    this.openOrder = openOrder;
    this.list = byId("notifications");
    this.empty = byId("feed-empty");
    this.more = byId("load-more");
    this.items = new Map(); // id -> notification
    this.rows = new Map(); // id -> <li>
    this.filters = {};
    this.cursor = null;
    this.generation = 0; // a filter change makes answers to earlier requests stale
    this.more.addEventListener("click", () => this.loadMore());
  }

  matches(n) {
    const f = this.filters;
    if (f.unreadOnly && n.is_read) return false;
    if (f.severity && n.severity !== f.severity) return false;
    if (f.type && n.type !== f.type) return false;
    return true;
  }

  /** Start over with these filters: the first page, newest first. */
  async reset(filters) {
    this.filters = { ...filters };
    this.generation += 1;
    this.items.clear();
    this.rows.clear();
    this.list.replaceChildren();
    this.cursor = null;
    this.more.hidden = true;
    await this.loadPage(null, true);
  }

  /** The first page again, merged in (rows already shown stay; new and changed ones update). */
  async refreshTop() {
    await this.loadPage(null, this.items.size === 0);
  }

  async loadMore() {
    if (!this.cursor) return;
    this.more.disabled = true;
    try {
      await this.loadPage(this.cursor, true);
    } finally {
      this.more.disabled = false;
    }
  }

  async loadPage(cursor, takeCursor) {
    const generation = this.generation;
    let page;
    try {
      page = await this.api.notifications(this.filters, { cursor, limit: this.pageSize });
    } catch (error) {
      this.report(`Could not load the notifications: ${error.message}`);
      return;
    }
    if (generation !== this.generation) return;
    for (const n of page.items) this.put(n, { fromPage: true });
    if (takeCursor) this.cursor = page.next_cursor;
    this.more.hidden = !this.cursor;
    this.report("");
    this.showEmpty();
  }

  /** Notifications that occurred (first or again) since `when`: what a replay by id misses. */
  async catchUp(when) {
    const generation = this.generation;
    const since = new Date(when.getTime() - 5_000).toISOString(); // clocks are not exact
    try {
      const page = await this.api.notifications({ ...this.filters, since }, { limit: 200 });
      if (generation !== this.generation) return;
      for (const n of page.items) this.put(n, { fromPage: true });
      this.showEmpty();
    } catch (error) {
      this.report(`Could not catch up: ${error.message}`);
    }
  }

  /** A notification from the live feed. */
  receive(n) {
    this.put(n, { fromPage: false });
    this.showEmpty();
    this.changed();
  }

  put(incoming, { fromPage }) {
    const id = incoming.id;
    const known = this.items.get(id);
    const n = merged(known, incoming);
    if (!this.matches(n)) {
      this.drop(id);
      return;
    }
    const oldest = this.oldestShown();
    // Below the loaded pages (an old one counted up): "load more" brings it, in its place.
    if (!known && !fromPage && this.cursor && oldest !== null && id < oldest) return;
    this.items.set(id, n);
    const row = this.render(n, Boolean(known) && !fromPage);
    const previous = this.rows.get(id);
    if (previous) {
      const focused = previous.contains(document.activeElement) ? document.activeElement : null;
      const open = previous.querySelector("details")?.open;
      if (open) row.querySelector("details").open = true;
      previous.replaceWith(row);
      if (focused?.dataset.action) row.querySelector(`[data-action="${focused.dataset.action}"]`)?.focus();
    } else {
      this.list.insertBefore(row, this.rowAfter(id));
    }
    this.rows.set(id, row);
  }

  oldestShown() {
    let oldest = null;
    for (const id of this.rows.keys()) if (oldest === null || id < oldest) oldest = id;
    return oldest;
  }

  /** The row a new row with `id` goes before (rows are by id, newest first). */
  rowAfter(id) {
    for (const row of this.list.children) {
      if (Number(row.dataset.id) < id) return row;
    }
    return null;
  }

  drop(id) {
    this.items.delete(id);
    const row = this.rows.get(id);
    if (row) {
      const next = row.nextElementSibling || row.previousElementSibling;
      const hadFocus = row.contains(document.activeElement);
      row.remove();
      this.rows.delete(id);
      if (hadFocus) (next?.querySelector("button") || byId("feed-heading")).focus();
    }
  }

  showEmpty() {
    this.empty.hidden = this.rows.size > 0;
  }

  async markRead(id) {
    try {
      const n = await this.api.markRead(id);
      this.put(n, { fromPage: true });
      this.showEmpty();
      this.changed();
    } catch (error) {
      this.report(`Could not mark notification ${id} read: ${error.message}`);
    }
  }

  async remove(id) {
    try {
      await this.api.remove(id);
    } catch (error) {
      if (error.status !== 404) {
        this.report(`Could not delete notification ${id}: ${error.message}`);
        return;
      }
    }
    this.drop(id);
    this.showEmpty();
    this.changed();
  }

  async markAllRead() {
    try {
      const { updated } = await this.api.markAllRead(this.filters);
      this.report(`${updated} marked read.`);
    } catch (error) {
      this.report(`Could not mark them read: ${error.message}`);
      return;
    }
    await this.reset(this.filters);
    this.changed();
  }

  render(n, countedUp) {
    const title = `${n.title}`;
    const metadata = Object.entries(n.metadata || {});
    const occurrences =
      n.occurrences > 1
        ? h("span", { class: "occurrences", title: "times it occurred" }, `×${n.occurrences}`)
        : null;
    return h(
      "li",
      {
        class: `notification sev-${n.severity}${n.is_read ? " read" : ""}${countedUp ? " flash" : ""}`,
        dataset: { id: n.id, severity: n.severity, type: n.type, read: n.is_read },
      },
      h(
        "div",
        { class: "line" },
        h("span", { class: `badge sev-${n.severity}` }, n.severity),
        h("span", { class: "type" }, n.type),
        occurrences,
        n.is_read ? h("span", { class: "state" }, "read") : h("span", { class: "state unread" }, "unread"),
      ),
      h("h3", { class: "title" }, title),
      h("p", { class: "text" }, n.message),
      h(
        "p",
        { class: "when" },
        "First ",
        timeElement(n.created_at),
        n.occurrences > 1 ? [" · last ", timeElement(n.last_occurred_at)] : null,
        ` · #${n.id}`,
      ),
      metadata.length
        ? h(
            "details",
            {},
            h("summary", {}, "Details"),
            h(
              "dl",
              {},
              metadata.map(([key, value]) => [
                h("dt", {}, key),
                h(
                  "dd",
                  {},
                  typeof value === "string" && value.includes("\n")
                    ? h("pre", {}, value)
                    : typeof value === "string"
                      ? value
                      : JSON.stringify(value),
                ),
              ]),
              h("dt", {}, "fingerprint"),
              h("dd", {}, n.fingerprint),
            ),
          )
        : null,
      h(
        "div",
        { class: "actions" },
        this.openOrder && typeof n.metadata?.order_id === "string"
          ? h(
              "button",
              {
                type: "button",
                dataset: { action: "open-order" },
                "aria-label": `Open order: ${title}`,
                onclick: () => this.openOrder(n.metadata.order_id),
              },
              "Open order",
            )
          : null,
        n.is_read
          ? null
          : h(
              "button",
              {
                type: "button",
                dataset: { action: "read" },
                "aria-label": `Mark read: ${title}`,
                onclick: () => this.markRead(n.id),
              },
              "Mark read",
            ),
        h(
          "button",
          {
            type: "button",
            class: "danger",
            dataset: { action: "delete" },
            "aria-label": `Delete: ${title}`,
            onclick: () => this.remove(n.id),
          },
          "Delete",
        ),
      ),
    );
  }

  clear() {
    this.generation += 1;
    this.items.clear();
    this.rows.clear();
    fill(this.list);
    this.cursor = null;
    this.more.hidden = true;
    this.empty.hidden = true;
  }
}
