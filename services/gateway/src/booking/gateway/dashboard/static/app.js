// The dashboard's composition: sign-in, then the feed, its live socket, the counts, the chart,
// the health grid, the order desk and the dead letters, all started together and stopped
// together on sign-out. Every admin action goes through the one confirmation dialog.

import { Api } from "./api.js";
import { Confirmation } from "./confirm.js";
import { DeadLetters } from "./deadletters.js";
import { byId, fill, h } from "./dom.js";
import { Feed } from "./feed.js";
import { HealthGrid } from "./health.js";
import { LiveFeed } from "./live.js";
import { OrderDesk } from "./orders.js";
import {
  TokenProblem,
  checkToken,
  cleanToken,
  forgetToken,
  msUntilExpiry,
  storedToken,
  storeToken,
} from "./session.js";
import { Stats } from "./stats.js";

const STATS_EVERY_MS = 60_000;
const LONGEST_TIMER_MS = 2 ** 31 - 1;

const page = {
  signIn: byId("sign-in"),
  form: byId("sign-in-form"),
  tokenInput: byId("token"),
  signInMessage: byId("sign-in-message"),
  dashboard: byId("dashboard"),
  banner: byId("banner"),
  feedMessage: byId("feed-message"),
  live: byId("live"),
  who: byId("who"),
  signOut: byId("sign-out"),
  filters: byId("filters"),
  readAll: byId("read-all"),
};

let token = null;
let expiryTimer = null;
let statsTimer = null;
let countdown = null;

function refusal(error) {
  if (error.status === 403) {
    return `This token is not an admin's: the server refused it (403: ${error.detail}).`;
  }
  if (/expired/i.test(error.detail)) {
    return `This token has expired (401: ${error.detail}). Paste a new admin token.`;
  }
  return `The server refused this token (401: ${error.detail}).`;
}

const api = new Api(
  () => token,
  (error) => {
    if (token !== null) signOut(refusal(error));
  },
);

/** Notifications per page: 50, or `?limit=N` (1..200) to page in smaller steps. */
function pageSize() {
  const asked = Number.parseInt(new URLSearchParams(location.search).get("limit") ?? "", 10);
  return Number.isInteger(asked) && asked >= 1 && asked <= 200 ? asked : 50;
}

function reportFeed(text) {
  page.feedMessage.textContent = text;
}

function reportBanner(text) {
  page.banner.textContent = text;
  page.banner.hidden = !text;
}

const stats = new Stats(api, reportBanner);
const confirmation = new Confirmation();
const orders = new OrderDesk(api, confirmation);
const openOrder = (id) => orders.open(id);
const feed = new Feed(api, () => stats.soon(), reportFeed, pageSize(), openOrder);
const deadLetters = new DeadLetters(api, confirmation, openOrder);
const health = new HealthGrid(api);
const live = new LiveFeed(() => token, {
  notification: (n) => {
    feed.receive(n);
    // A dead letter is reported as a SystemError: the list has a new (or returning) one.
    if (n.type === "SystemError") deadLetters.refresh();
  },
  state: showLive,
  fresh: () => {
    feed.refreshTop();
    stats.soon();
    deadLetters.refresh();
  },
  resumed: (awaySince) => {
    if (awaySince) feed.catchUp(awaySince);
    stats.soon();
    deadLetters.refresh();
  },
  refused: () => {
    // A browser is not told why a handshake failed: ask over HTTP (a 401/403 signs out).
    if (token !== null) api.notifications({}, { limit: 1 }).catch(() => {});
  },
  expired: () => signOut("Your token has expired: the live feed was closed. Paste a new admin token."),
});

function showLive(state, detail = {}) {
  clearInterval(countdown);
  countdown = null;
  page.live.dataset.state = state;
  const texts = {
    connecting: "Connecting…",
    "catching-up": "Catching up…",
    live: "Live",
    stopped: "Offline",
  };
  if (state !== "offline") {
    page.live.textContent = texts[state] || state;
    return;
  }
  // "Offline" is announced once; the countdown beside it is for the eyes only.
  const countdownText = h("span", { "aria-hidden": "true" });
  fill(page.live, "Offline", countdownText);
  const tell = () => {
    const seconds = Math.max(0, Math.ceil((detail.retryAt - Date.now()) / 1000));
    countdownText.textContent = ` · retrying in ${seconds} s`;
  };
  tell();
  countdown = setInterval(tell, 1000);
}

function currentFilters() {
  const data = new FormData(page.filters);
  return {
    unreadOnly: data.get("unreadOnly") ? "true" : "",
    severity: data.get("severity") || "",
    type: data.get("type") || "",
  };
}

async function signIn(text, { remembered = false } = {}) {
  const candidate = cleanToken(text);
  let claims;
  try {
    claims = checkToken(candidate);
  } catch (problem) {
    if (!(problem instanceof TokenProblem)) throw problem;
    if (remembered) forgetToken();
    showSignIn(problem.message);
    return;
  }
  page.signInMessage.textContent = "Signing in…";
  // The server has the last word: one cheap call with the token.
  const probe = new Api(() => candidate, () => {});
  let unchecked = null;
  try {
    await probe.notifications({}, { limit: 1 });
  } catch (error) {
    if (error.status === 401 || error.status === 403) {
      if (remembered) forgetToken();
      showSignIn(refusal(error));
      return;
    }
    // The feed is down, not the token: in; the health grid will say what is failing, and
    // every call still checks the token.
    unchecked = `The token could not be checked yet (${error.message}).`;
  }
  token = candidate;
  storeToken(candidate);
  page.tokenInput.value = "";
  page.signInMessage.textContent = "";
  page.signIn.hidden = true;
  page.dashboard.hidden = false;
  page.signOut.hidden = false;
  page.who.hidden = false;
  page.who.textContent = `admin ${claims.sub ?? ""}`.trim();
  const left = msUntilExpiry(claims);
  if (left !== null) {
    const when = new Date(claims.exp * 1000).toLocaleString();
    expiryTimer = setTimeout(
      () => signOut(`Your token expired at ${when}. Paste a new admin token.`),
      Math.min(left, LONGEST_TIMER_MS),
    );
  }
  health.start();
  live.start();
  statsTimer = setInterval(() => stats.soon(), STATS_EVERY_MS);
  reportBanner(unchecked ?? "");
  await Promise.all([feed.reset(currentFilters()), stats.refresh(), deadLetters.reset()]);
}

function signOut(message) {
  token = null;
  forgetToken();
  clearTimeout(expiryTimer);
  clearInterval(statsTimer);
  confirmation.dismiss();
  live.stop();
  health.stop();
  stats.clear();
  feed.clear();
  orders.clear();
  deadLetters.clear();
  reportBanner("");
  reportFeed("");
  showSignIn(message);
}

function showSignIn(message) {
  page.dashboard.hidden = true;
  page.signOut.hidden = true;
  page.who.hidden = true;
  page.signIn.hidden = false;
  page.signInMessage.textContent = message;
  page.tokenInput.focus();
  // A refused token stays to be looked at, selected: pasting the next one replaces it.
  page.tokenInput.select();
}

page.form.addEventListener("submit", (event) => {
  event.preventDefault();
  signIn(page.tokenInput.value);
});
page.tokenInput.addEventListener("keydown", (event) => {
  // Enter signs in (a token has no line breaks); Shift+Enter is left alone.
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    page.form.requestSubmit();
  }
});
page.signOut.addEventListener("click", () => signOut("Signed out."));
page.filters.addEventListener("change", () => feed.reset(currentFilters()));
page.filters.addEventListener("submit", (event) => event.preventDefault());
page.readAll.addEventListener("click", () => feed.markAllRead());

const remembered = storedToken();
if (remembered) {
  signIn(remembered, { remembered: true });
} else {
  showSignIn("");
}
