"""Graph passes, one per file. ``STRATEGIES`` names the ways a WSNet layer can be lowered
(``strategy.StrategyPass`` applies them); it lives here, free of any tensor library, so the
command line lists it without importing one."""

STRATEGIES = ("auto", "fold", "shared", "custom")

GOALS = ("balanced", "size", "speed")
"""What ``auto`` optimises: ``balanced`` (the default) takes the smaller WSNet lowering
unless the dense one is estimated faster by more than ``strategy.ESTIMATE_ERROR``, ``size``
always the smaller, ``speed`` whichever is estimated strictly faster."""
