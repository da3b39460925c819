"""What every service shares: settings, database, broker, outbox, inbox, health, auth, logging."""
