// The order desk: an order looked up by id (its status, payment, session and escrow), and what
// an admin may do to it, each behind the confirmation dialog and offered only when the state
// allows it: cancel the order, retry its session's scheduling, settle its escrow (release it,
// refund it, record the refund made). The order shown is read again every few seconds, since
// the services answer an action at once and carry its effects on by events.

import { byId, fill, h, timeElement } from "./dom.js";

export const ORDER_EVERY_MS = 3_000;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

// What the state machines allow (docs/recovery.md sections 4 and 7); the services decide.
const LIVE_ORDER = new Set(["pending", "awaiting_payment", "paid", "confirmed"]);
const UNSCHEDULED = new Set(["awaiting_calendar", "scheduling_failed"]);

/** Money in minor units as the currency writes it: 120000 TND -> "120.000 TND". */
export function money(m) {
  if (!m) return "—";
  let digits = 2;
  try {
    digits = new Intl.NumberFormat("en", { style: "currency", currency: m.currency }).resolvedOptions()
      .maximumFractionDigits;
  } catch {
    // an unknown code: two decimals
  }
  const sign = m.amount < 0 ? "-" : "";
  const units = String(Math.abs(m.amount)).padStart(digits + 1, "0");
  const whole = units.slice(0, units.length - digits);
  const fraction = digits ? `.${units.slice(units.length - digits)}` : "";
  return `${sign}${whole}${fraction} ${m.currency}`;
}

/** What the escrow's money is, where it stands. */
function escrowAmount(escrow) {
  const share = money(escrow.escrow_amount);
  const refund = escrow.refund_amount ? money(escrow.refund_amount) : "all the mentee paid";
  switch (escrow.status) {
    case "released":
      return `${share} released to the mentor`;
    case "refund_due":
      return `${refund} owed back to the mentee`;
    case "refunded":
      return `${refund} paid back to the mentee`;
    default:
      return `${share}, the mentor's share`;
  }
}

export class OrderDesk {
  /** api: Api; confirmation: Confirmation */
  constructor(api, confirmation) {
    this.api = api;
    this.confirmation = confirmation;
    this.form = byId("order-lookup");
    this.input = byId("order-id");
    this.message = byId("order-message");
    this.view = byId("order-view");
    this.heading = byId("order-heading");
    this.shown = null; // {order, escrow, scheduling} on display
    this.drawn = ""; // what the view shows, to redraw only on a change
    this.timer = null;
    this.generation = 0; // another lookup makes answers about the previous order stale
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.lookUp(this.input.value);
    });
  }

  report(text) {
    this.message.textContent = text;
  }

  /** Show order `id` (and keep it fresh until another is looked up). */
  async lookUp(text) {
    const id = String(text || "").trim();
    this.stop();
    this.generation += 1;
    this.shown = null;
    this.drawn = "";
    this.view.hidden = true;
    fill(this.view);
    if (!UUID.test(id)) {
      this.report(id ? `"${id}" is not an order id: an order's id is a UUID.` : "Type an order's id.");
      return;
    }
    this.input.value = id;
    this.report("Looking up…");
    if (await this.refresh()) this.follow();
  }

  /** Open an order from elsewhere on the page (a notification, a dead letter). */
  async open(id) {
    this.heading.scrollIntoView({ block: "start" });
    this.heading.focus({ preventScroll: true });
    await this.lookUp(id);
  }

  follow() {
    this.stop();
    this.timer = setTimeout(async () => {
      await this.refresh();
      if (this.shown) this.follow();
    }, ORDER_EVERY_MS);
  }

  stop() {
    clearTimeout(this.timer);
    this.timer = null;
  }

  /** The order and its escrow, read again; false when the order could not be read. */
  async refresh() {
    const generation = this.generation;
    const id = this.shown?.order.id ?? this.input.value.trim();
    const [order, escrow] = await Promise.allSettled([this.api.order(id), this.api.escrow(id)]);
    if (generation !== this.generation) return false;
    if (order.status === "rejected") {
      this.report(`Could not read order ${id}: ${order.reason.message}`);
      return false;
    }
    // 404: no money was ever recorded for it. Another failure: what was known stays shown.
    let known = this.shown?.escrow ?? null;
    let escrowProblem = "";
    if (escrow.status === "fulfilled") {
      known = escrow.value;
    } else if (escrow.reason.status === 404) {
      known = null;
    } else {
      escrowProblem = `The escrow could not be read from payments: ${escrow.reason.message}`;
    }
    this.show({ order: order.value, escrow: known, scheduling: this.shown?.scheduling ?? null });
    this.report(escrowProblem);
    return true;
  }

  show(state) {
    this.shown = state;
    const drawing = JSON.stringify(state);
    if (drawing === this.drawn) return;
    this.drawn = drawing;
    const focusedAction = this.view.contains(document.activeElement) ? document.activeElement.dataset.action : null;
    fill(this.view, this.render(state));
    this.view.hidden = false;
    if (focusedAction) this.view.querySelector(`[data-action="${focusedAction}"]`)?.focus();
  }

  render({ order, escrow, scheduling }) {
    const session = order.session;
    const escrowStatus = escrow?.status ?? order.escrow?.status ?? null;
    const facts = [
      ["Status", h("span", { class: "order-status", dataset: { status: order.status } }, order.status)],
      ["Amount", `${money(order.amount)} · paid ${money(order.amount_paid)}`],
      [
        "Payment",
        order.payment ? `${order.payment.status}${order.payment.ref ? ` · ${order.payment.ref}` : ""}` : "not opened yet",
      ],
      [
        "Session",
        h(
          "span",
          {},
          h("span", { class: "session-status", dataset: { status: session.status } }, session.status),
          " · ",
          timeElement(session.start_at),
          " → ",
          timeElement(session.end_at),
        ),
      ],
      ["Session id", session.id],
      session.meet_link ? ["Meet", session.meet_link] : null,
      [
        "Escrow",
        escrowStatus
          ? h(
              "span",
              {},
              h("span", { class: "escrow-status", dataset: { status: escrowStatus } }, escrowStatus),
              escrow ? ` · ${escrowAmount(escrow)}` : "",
            )
          : h("span", { class: "escrow-status", dataset: { status: "none" } }, "none (no money recorded)"),
      ],
      escrow?.reason ? ["Escrow reason", escrow.reason] : null,
      escrow?.reference ? ["Refund reference", escrow.reference] : null,
      escrow?.release_due_at ? ["Release due", timeElement(escrow.release_due_at)] : null,
      scheduling
        ? [
            "Scheduling",
            h(
              "span",
              { class: "scheduling", dataset: { status: scheduling.status } },
              `${scheduling.status}${scheduling.reason ? ` (${scheduling.reason})` : ""}` +
                ` · ${scheduling.attempts} attempt${scheduling.attempts === 1 ? "" : "s"}` +
                (scheduling.final ? " · final" : ""),
              scheduling.next_attempt_at ? [" · next ", timeElement(scheduling.next_attempt_at)] : null,
            ),
          ]
        : null,
    ].filter(Boolean);

    const actions = [];
    if (LIVE_ORDER.has(order.status)) {
      actions.push(this.button("cancel", "Cancel order", () => this.cancel(order), true));
    }
    if (UNSCHEDULED.has(session.status) && (order.status === "paid" || order.status === "confirmed")) {
      actions.push(this.button("retry-scheduling", "Retry scheduling", () => this.retryScheduling(order)));
    }
    if (escrowStatus === "frozen") {
      actions.push(this.button("release", "Release escrow", () => this.settle(order, escrow, "release")));
      actions.push(this.button("refund", "Refund mentee", () => this.settle(order, escrow, "refund"), true));
    }
    if (escrowStatus === "refund_due") {
      actions.push(this.button("refunded", "Record refund", () => this.settle(order, escrow, "refunded")));
    }

    return h(
      "article",
      { class: "order-card", dataset: { orderId: order.id, status: order.status } },
      h("h3", { class: "title" }, `Order ${order.id}`),
      h("dl", {}, facts.map(([key, value]) => [h("dt", {}, key), h("dd", {}, value)])),
      actions.length ? h("div", { class: "actions" }, actions) : h("p", { class: "note" }, "Nothing to act on."),
      h("p", { class: "when" }, `Kept up to date: read again every ${ORDER_EVERY_MS / 1000} s.`),
    );
  }

  button(action, text, onclick, danger = false) {
    return h("button", { type: "button", class: danger ? "danger" : null, dataset: { action }, onclick }, text);
  }

  async cancel(order) {
    const done = await this.confirmation.ask({
      title: `Cancel order ${order.id}?`,
      text:
        "Its slot is freed and the session's Google event deleted. A paid order's escrow is " +
        "frozen until an admin releases or refunds it. A cancelled order cannot be revived.",
      confirm: "Cancel order",
      danger: true,
      reason: "required",
      run: ({ reason }) => this.api.cancelOrder(order.id, reason),
    });
    if (!done) return;
    this.changed(`Order ${order.id} cancelled.`, { order: done });
  }

  async retryScheduling(order) {
    const done = await this.confirmation.ask({
      title: `Retry the scheduling of session ${order.session.id}?`,
      text:
        "The calendar service tries now to put the session in the mentor's Google calendar, " +
        "on a new retry schedule.",
      confirm: "Retry now",
      reason: "optional",
      run: ({ reason }) => this.api.retryScheduling(order.session.id, reason),
    });
    if (!done) return;
    this.changed(`Scheduling of session ${order.session.id}: ${done.status}.`, { scheduling: done });
  }

  async settle(order, escrow, action) {
    const share = escrow ? `The mentor's share, ${money(escrow.escrow_amount)},` : "The mentor's share";
    const owed = escrow?.refund_amount ? ` (${money(escrow.refund_amount)})` : "";
    const questions = {
      release: {
        title: `Release the escrow of order ${order.id}?`,
        text: `${share} is released to the mentor. This cannot be undone.`,
        confirm: "Release",
      },
      refund: {
        title: `Refund the mentee of order ${order.id}?`,
        text:
          `The mentee is owed back all they paid, the platform's fee included${owed}. Konnect has ` +
          "no refund API: pay it back by other means, then record the refund here.",
        confirm: "Refund",
        danger: true,
      },
      refunded: {
        title: `Record the refund of order ${order.id}?`,
        text: `Record that what the mentee was owed${owed} was paid back, with the payment's reference.`,
        confirm: "Record refund",
        reference: true,
      },
    };
    const done = await this.confirmation.ask({
      ...questions[action],
      reason: "required",
      run: ({ reason, reference }) =>
        this.api.settleEscrow(order.id, reference ? { action, reason, reference } : { action, reason }),
    });
    if (!done) return;
    this.changed(`Escrow of order ${order.id}: ${done.status}.`, { escrow: done });
  }

  /** An action took effect: show what it answered at once, then the order as it now reads. */
  changed(text, answered) {
    if (!this.shown) return;
    this.show({ ...this.shown, ...answered });
    this.report(text);
    this.refresh().then((read) => {
      if (read) this.report(text);
    });
  }

  clear() {
    this.stop();
    this.generation += 1;
    this.shown = null;
    this.drawn = "";
    this.input.value = "";
    fill(this.view);
    this.view.hidden = true;
    this.report("");
  }
}
