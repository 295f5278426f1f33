"""Where campaigns keep their state: the ledger, the suppression list, the campaigns
themselves and their locks, on SQLite (one host) or PostgreSQL (many hosts)."""
