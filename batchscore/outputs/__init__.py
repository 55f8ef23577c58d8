"""Outputs: an output's layout and schema (`output`); workers write part files (`write`) into a
run's staging folder (`staging`); the driver holds the output's lease (`lease`), resumes a dead
run from its parts (`resume`) and commits (`commit`); a committed run read back (`committed`,
`result`)."""
