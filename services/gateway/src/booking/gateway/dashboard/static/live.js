// The live alert feed over /ws/admin (protocol: booking.gateway.alerts).
//
// The socket reconnects by itself with exponential backoff and jitter. It remembers the last
// notification id it knows of (the hello's last_id, then every frame's id) and, on every new
// connection, asks the server to replay what came after it ({"type": "resume", "after_id": K})
// before the live feed goes on: nothing published while it was away is missed. The page keys
// its rows by id, so a notification that arrives twice (a counted-up one, or a replay that
// overlaps what was live) updates its row instead of adding one.

const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 10_000;
// The server pings every 20 s by default: this long without any frame, the connection is dead
// even if the browser has not noticed yet.
const SILENCE_MS = 60_000;

const TOKEN_EXPIRED = 4401;

export class LiveFeed {
  /**
   * token: () => the bearer token.
   * on: {
   *   notification(data)            a new or counted-up notification
   *   state(state, detail)          "connecting" | "catching-up" | "live" | "offline" | "stopped"
   *   fresh()                       connected without a resume: the page should reload its top
   *   resumed(awaySince)            a resume replayed what was missed (awaySince: Date the socket
   *                                 went down): counted-up ones are not in a replay by id
   *   refused()                     the handshake failed: check the token over HTTP
   *   expired()                     the server closed the socket because the token expired
   * }
   */
  constructor(token, on) {
    this.token = token;
    this.on = on;
    this.socket = null;
    this.lastId = null;
    this.attempt = 0;
    this.timer = null;
    this.silence = null;
    this.stopped = true;
    this.awaySince = null;
    this.retryAt = null;
    this.onOnline = () => {
      if (!this.stopped && !this.socket) this.connectNow();
    };
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    window.addEventListener("online", this.onOnline);
    this.connectNow();
  }

  stop() {
    this.stopped = true;
    window.removeEventListener("online", this.onOnline);
    clearTimeout(this.timer);
    clearTimeout(this.silence);
    const socket = this.socket;
    this.socket = null;
    if (socket) socket.close(1000, "signed out");
    this.lastId = null;
    this.awaySince = null;
    this.attempt = 0;
    this.on.state("stopped");
  }

  /** Note an id the page learnt of elsewhere (its first page), so a resume starts after it. */
  saw(id) {
    if (this.lastId === null || id > this.lastId) this.lastId = id;
  }

  connectNow() {
    clearTimeout(this.timer);
    this.timer = null;
    this.retryAt = null;
    if (this.stopped) return;
    const url = new URL("/ws/admin", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("access_token", this.token());
    let socket;
    try {
      socket = new WebSocket(url);
    } catch {
      this.retry();
      return;
    }
    this.socket = socket;
    let opened = false;
    let resumedFrom = null;
    this.on.state("connecting");

    socket.onopen = () => {
      if (socket !== this.socket) return;
      opened = true;
      this.heard();
      if (this.lastId !== null) {
        // Before the hello: nothing live comes ahead of the replay.
        resumedFrom = this.lastId;
        socket.send(JSON.stringify({ type: "resume", after_id: this.lastId }));
        this.on.state("catching-up");
      }
    };

    socket.onmessage = (message) => {
      if (socket !== this.socket) return;
      this.heard();
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return;
      }
      switch (frame.type) {
        case "hello":
          this.attempt = 0; // the connection works: the next failure starts the backoff over
          if (resumedFrom === null) {
            if (typeof frame.last_id === "number") this.saw(frame.last_id);
            this.awaySince = null;
            this.on.state("live");
            this.on.fresh();
          }
          break;
        case "resumed": {
          const awaySince = this.awaySince;
          this.awaySince = null;
          this.on.state("live");
          this.on.resumed(awaySince);
          break;
        }
        case "notification":
          if (frame.data && typeof frame.data.id === "number") {
            this.saw(frame.data.id);
            this.on.notification(frame.data);
          }
          break;
        case "ping":
          socket.send(JSON.stringify({ type: "pong" }));
          break;
        case "error":
          this.onError(socket, frame);
          break;
        default:
          break;
      }
    };

    socket.onclose = (event) => {
      if (socket !== this.socket) return;
      this.socket = null;
      clearTimeout(this.silence);
      if (this.awaySince === null) this.awaySince = new Date();
      if (event.code === TOKEN_EXPIRED) {
        this.on.expired();
        return;
      }
      if (!opened) this.on.refused();
      this.retry();
    };
  }

  onError(socket, frame) {
    if (frame.code === "feed_interrupted") {
      // This replica's queue was recreated and it could not tell where we were: catch up.
      if (this.lastId !== null) {
        if (this.awaySince === null) this.awaySince = new Date();
        socket.send(JSON.stringify({ type: "resume", after_id: this.lastId }));
        this.on.state("catching-up");
      } else {
        this.on.fresh();
      }
    } else if (frame.code === "resume_failed") {
      // The notifications service could not replay: a new connection resumes again, later.
      socket.close(4000, "resume failed; reconnecting");
    }
  }

  heard() {
    clearTimeout(this.silence);
    const socket = this.socket;
    this.silence = setTimeout(() => {
      if (socket === this.socket && socket) socket.close(4000, "no frame for too long");
    }, SILENCE_MS);
  }

  retry() {
    if (this.stopped) return;
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.attempt);
    const delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2); // jitter
    this.attempt += 1;
    this.retryAt = Date.now() + delay;
    this.on.state("offline", { retryAt: this.retryAt });
    this.timer = setTimeout(() => this.connectNow(), delay);
  }
}
