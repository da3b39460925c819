// The gateway's public API as the dashboard uses it (docs/api.md and docs/health.md).
// Errors are problem+json; an ApiError carries the status and the server's own `detail`.

const HEALTH_JSON = "application/health+json";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status; // 0: the gateway could not be reached
    this.detail = detail;
  }
}

async function problemDetail(response) {
  try {
    const body = await response.json();
    if (body && typeof body.detail === "string") return body.detail;
  } catch {
    // not JSON: say what HTTP said
  }
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

export class Api {
  /** token: () => the current bearer token; onUnauthorized(error) is told of every 401/403. */
  constructor(token, onUnauthorized) {
    this.token = token;
    this.onUnauthorized = onUnauthorized;
  }

  /** params: the query string (empty values left out); body: sent as JSON when given. */
  async request(method, path, params, body) {
    const response = await this.send(method, path, params, body);
    return response.status === 204 ? null : response.json();
  }

  /** The response of a call that succeeded; an ApiError (401/403 told) for any other. */
  async send(method, path, params, body, accept = "application/json") {
    const url = new URL(path, location.origin);
    for (const [name, value] of Object.entries(params || {})) {
      if (value !== null && value !== undefined && value !== "" && value !== false) {
        url.searchParams.set(name, String(value));
      }
    }
    const headers = { Authorization: `Bearer ${this.token()}`, Accept: accept };
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(url, init);
    } catch {
      throw new ApiError(0, "The gateway cannot be reached.");
    }
    // A health report answers 503 when the system fails: that is the report, not an error.
    const type = response.headers.get("Content-Type") || "";
    const report = response.status === 503 && type.startsWith(HEALTH_JSON);
    if (!response.ok && !report) {
      const error = new ApiError(response.status, await problemDetail(response));
      if (response.status === 401 || response.status === 403) this.onUnauthorized(error);
      throw error;
    }
    return response;
  }

  /** The health of the gateway and of every service, check by check (admins only). */
  async health() {
    const accept = `${HEALTH_JSON}, application/json`;
    const response = await this.send("GET", "/api/admin/health", null, undefined, accept);
    try {
      return await response.json();
    } catch {
      throw new ApiError(response.status, `The gateway answered HTTP ${response.status} without a health report.`);
    }
  }

  /** filters: {unreadOnly, severity, type, since}; -> {items, next_cursor} newest first */
  notifications(filters, { cursor, limit } = {}) {
    return this.request("GET", "/api/admin/notifications", { ...filters, cursor, limit });
  }

  markRead(id) {
    return this.request("POST", `/api/admin/notifications/${encodeURIComponent(id)}/read`);
  }

  markAllRead(filters) {
    return this.request("POST", "/api/admin/notifications/read-all", filters);
  }

  remove(id) {
    return this.request("DELETE", `/api/admin/notifications/${encodeURIComponent(id)}`);
  }

  summary(days) {
    return this.request("GET", "/api/admin/notifications/summary", { days });
  }

  // --- admin actions (docs/recovery.md section 7) ---

  /** filters: {service, status, type}; -> {items, next_cursor} newest first, across services */
  deadLetters(filters, { cursor, limit } = {}) {
    return this.request("GET", "/api/admin/dead-letters", { ...filters, cursor, limit });
  }

  /** One dead letter with its envelope; its id (`payments:42`) names its service. */
  deadLetter(id) {
    return this.request("GET", deadLetterPath(id));
  }

  replayDeadLetter(id, reason) {
    return this.request("POST", `${deadLetterPath(id)}/replay`, null, reason ? { reason } : {});
  }

  discardDeadLetter(id, reason) {
    return this.request("POST", `${deadLetterPath(id)}/discard`, null, { reason });
  }

  /** Every kept dead letter (of `service` when given) back to its consumer; -> {replayed} */
  replayAllDeadLetters(service) {
    return this.request("POST", "/api/admin/dead-letters/replay", null, service ? { service } : {});
  }

  order(id) {
    return this.request("GET", `/api/orders/${encodeURIComponent(id)}`);
  }

  cancelOrder(id, reason) {
    return this.request("POST", `/api/admin/orders/${encodeURIComponent(id)}/cancel`, null, { reason });
  }

  retryScheduling(sessionId, reason) {
    const path = `/api/admin/sessions/${encodeURIComponent(sessionId)}/retry-scheduling`;
    return this.request("POST", path, null, reason ? { reason } : {});
  }

  escrow(orderId) {
    return this.request("GET", `/api/admin/orders/${encodeURIComponent(orderId)}/escrow`);
  }

  /** settlement: {action: "release" | "refund" | "refunded", reason, reference?} */
  settleEscrow(orderId, settlement) {
    return this.request("POST", `/api/admin/orders/${encodeURIComponent(orderId)}/escrow`, null, settlement);
  }
}

function deadLetterPath(id) {
  return `/api/admin/dead-letters/${encodeURIComponent(id)}`;
}
