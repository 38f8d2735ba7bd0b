"""The run directory's lifecycle: what a run writes (`outputs`), its checkpoint record (`state`),
continuing a stopped run (`resume`, `callback`), and stopping cleanly on a signal (`interrupts`)
or for lack of memory or disk (`faults`)."""
