// The payer's page after Konnect: follows one order live and says where the booking stands.
//
// Its address is /pay/return/<order id>?outcome=success|failed&token=<order link>, as payments
// gave it to Konnect (Konnect adds payment_ref, not needed here). The order comes from
// GET /api/orders/<id>/events?access_token=<the link's token>: Server-Sent Events, `event: order`
// with the order as GET /api/orders/<id> shows it, first as it is, then at each change; the
// stream ends with the order, and answers 204 when nothing new remains. Every order event holds
// the whole order, so the page just draws the latest. Text goes in as text, never as markup.

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
// Statuses after which the order moves no more: the stream closes, and so does the page's.
const ENDED = new Set(["confirmed", "payment_failed", "cancelled"]);
const RETRY_FIRST_MS = 1_000;
const RETRY_MAX_MS = 30_000;

const NOT_SCHEDULED = ["waiting", "Not scheduled yet"];

function byId(id) {
  const el = document.getElementById(id);
  if (!el) throw new Error(`the page has no #${id}`);
  return el;
}

/** The order id, the token and the outcome the address carries. */
function readAddress() {
  const query = new URLSearchParams(location.search);
  const outcome = query.get("outcome");
  return {
    orderId: decodeURIComponent(location.pathname.split("/").pop() || ""),
    token: query.get("token") || "",
    outcome: outcome === "success" || outcome === "failed" ? outcome : null,
  };
}

/** `url` if it is a web address (never javascript: or data:), else null. */
function webLink(url, protocols = ["https:", "http:"]) {
  try {
    const parsed = new URL(url);
    return protocols.includes(parsed.protocol) ? parsed.href : null;
  } catch {
    return null;
  }
}

// --- what the order means for the payer ------------------------------------------------------

function awaitingPayment(order, outcome) {
  const payUrl = order.payment ? webLink(order.payment.pay_url) : null;
  if (order.amount_paid && order.amount_paid.amount > 0) {
    // Konnect took less than the amount: the payment stays open for the rest until it expires.
    return {
      state: "partly-paid",
      headline: "Part of the amount has arrived",
      message:
        "Konnect received part of the amount. Pay the rest before the payment link expires; " +
        "otherwise the time slot is freed and what you paid is refunded.",
      payment: ["working", "Partly paid"],
      session: NOT_SCHEDULED,
      retry: payUrl,
      retryLabel: "Pay the rest",
    };
  }
  if (outcome === "failed") {
    return {
      state: "payment-not-through",
      headline: "Your payment did not go through",
      message: payUrl
        ? "Konnect did not take the payment. Your time slot is kept until the payment link " +
          "expires: you can try again."
        : "Konnect did not take the payment. Your time slot is kept until the payment link " +
          "expires.",
      payment: ["failed", "Not paid"],
      session: NOT_SCHEDULED,
      retry: payUrl,
    };
  }
  return {
    state: "awaiting-payment",
    headline: "Confirming your payment",
    message: "We are waiting for Konnect to confirm your payment. This page updates by itself.",
    payment: ["working", "Waiting for Konnect's confirmation"],
    session: NOT_SCHEDULED,
  };
}

function paid(order) {
  const received = ["done", "Payment received"];
  switch (order.session.status) {
    case "scheduled":
      return {
        state: "scheduled",
        headline: "Your session is scheduled",
        message: "Payment received, and the session is in your mentor's calendar.",
        payment: received,
        session: ["done", "Scheduled"],
        schedule: order.session,
      };
    case "scheduling_failed":
      return {
        state: "scheduling-failed",
        headline: "Payment received, but the session is not scheduled yet",
        message:
          "We could not put the session in your mentor's calendar. The admins have been told: " +
          "they will schedule it again or refund you. You do not need to do anything.",
        payment: received,
        session: ["failed", "Could not be scheduled"],
      };
    default:
      return {
        state: "paid",
        headline: "Payment received",
        message:
          "We are putting the session in your mentor's calendar; its Google Meet link will " +
          "appear here.",
        payment: received,
        session: ["working", "Being scheduled"],
      };
  }
}

function describe(order, outcome) {
  const somethingPaid = Boolean(order.amount_paid && order.amount_paid.amount > 0);
  switch (order.status) {
    case "pending":
    case "awaiting_payment":
      return awaitingPayment(order, outcome);
    case "paid":
    case "confirmed":
      return paid(order);
    case "payment_failed":
      return {
        state: "payment-failed",
        headline: "The payment failed",
        message:
          "The payment was not completed before its link expired, so the time slot was freed. " +
          "Book the session again to choose a time." +
          (somethingPaid ? " What you paid will be refunded." : ""),
        payment: ["failed", "Not completed"],
        session: ["failed", "Cancelled: the time slot was freed"],
      };
    case "cancelled":
      return {
        state: "cancelled",
        headline: "This booking was cancelled",
        message: somethingPaid
          ? "The session will not take place and its time slot was freed. The admins will " +
            "contact you about what you paid."
          : "The booking ended before it was paid, so the time slot was freed. Book the " +
            "session again to choose a time.",
        payment: somethingPaid ? ["done", "Payment received"] : ["failed", "Not paid"],
        session: ["failed", "Cancelled"],
      };
    default:
      return {
        state: "unknown",
        headline: "Your booking",
        message: "We cannot tell where this booking stands right now.",
        payment: ["waiting", "Unknown"],
        session: ["waiting", "Unknown"],
      };
  }
}

// --- drawing -----------------------------------------------------------------------------------

function setStep(id, [state, text]) {
  byId(`step-${id}`).dataset.state = state;
  byId(`${id}-state`).textContent = text;
}

function showSchedule(session) {
  const start = new Date(session.start_at);
  const end = new Date(session.end_at);
  // The viewer's own zone, named: a payer abroad must not read the mentor's hour as theirs.
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
  const day = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "short" });
  const hour = new Intl.DateTimeFormat(undefined, { timeStyle: "short" });
  const when = byId("when");
  when.replaceChildren();
  const time = document.createElement("time");
  time.dateTime = start.toISOString();
  time.textContent = `${day.format(start)} to ${hour.format(end)}`;
  when.append(time);
  byId("zone").textContent = `(${zone} time)`;
  const meet = byId("meet");
  const link = webLink(session.meet_link, ["https:"]);
  meet.hidden = !link;
  if (link) meet.href = link;
  byId("schedule").hidden = false;
}

function show(view) {
  byId("booking").dataset.state = view.state;
  byId("headline").textContent = view.headline;
  byId("message").textContent = view.message;
  byId("steps").hidden = !view.payment;
  if (view.payment) setStep("payment", view.payment);
  if (view.session) setStep("session", view.session);
  if (view.schedule) showSchedule(view.schedule);
  else byId("schedule").hidden = true;
  byId("retry").hidden = !view.retry;
  if (view.retry) {
    const link = byId("pay-link");
    link.href = view.retry;
    link.textContent = view.retryLabel || "Try paying again";
  }
  document.title = `${view.headline} · Mentor booking`;
}

function showInvalidLink() {
  show({
    state: "invalid-link",
    headline: "This link is invalid or has expired",
    message:
      "It cannot show your booking: it is incomplete, or too old. Your booking itself is not " +
      "affected; see it where you booked the session.",
  });
  note(null);
}

function note(text) {
  const connection = byId("connection");
  connection.textContent = text || "";
  connection.hidden = !text;
}

// --- following the order ---------------------------------------------------------------------

/** What the stream answers to a plain request: its status, or 0 when nothing answered. Only
 * the status is read: the request is dropped as soon as its headers are in. */
async function statusOf(url) {
  const abort = new AbortController();
  try {
    const answer = await fetch(url, { signal: abort.signal, cache: "no-store" });
    return answer.status;
  } catch {
    return 0;
  } finally {
    abort.abort();
  }
}

function follow({ orderId, token, outcome }) {
  const url = new URL(`/api/orders/${encodeURIComponent(orderId)}/events`, location.href);
  url.searchParams.set("access_token", token);
  let last = null;
  let retryMs = RETRY_FIRST_MS;

  const open = () => {
    const source = new EventSource(url);
    source.addEventListener("order", (event) => {
      let order;
      try {
        order = JSON.parse(event.data);
      } catch {
        return; // not an order: the next event will be
      }
      last = order;
      retryMs = RETRY_FIRST_MS;
      show(describe(order, outcome));
      note(null);
    });
    source.addEventListener("error", () => {
      if (last && ENDED.has(last.status)) {
        source.close(); // the stream ended with the order: nothing more will come
        note(null);
        return;
      }
      if (source.readyState === EventSource.CONNECTING) {
        note("Connection lost: reconnecting…"); // the browser retries by itself
        return;
      }
      source.close();
      explain();
    });
  };

  // An EventSource that gives up does not say why; one plain request does.
  const explain = async () => {
    const status = await statusOf(url);
    if ([401, 403, 404, 422].includes(status)) {
      showInvalidLink();
      return;
    }
    note(
      status === 0
        ? "We cannot reach the server right now: trying again…"
        : `The server answered ${status}: trying again…`,
    );
    setTimeout(open, retryMs);
    retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
  };

  open();
}

function start() {
  const address = readAddress();
  if (!UUID.test(address.orderId) || !address.token) {
    showInvalidLink();
    return;
  }
  if (address.outcome === "failed") {
    byId("headline").textContent = "Your payment did not go through";
  }
  follow(address);
}

start();
