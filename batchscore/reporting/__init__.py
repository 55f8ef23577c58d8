"""Reporting: evaluation against known labels from per-part statistics (`evaluation`), drift
against a baseline run (`drift`), and `batchscore inspect` / `report` (`report`)."""
