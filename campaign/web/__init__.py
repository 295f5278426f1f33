"""The upload page and its JSON API (`campaign serve`)."""
