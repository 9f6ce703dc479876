"""Graph passes, one per file. ``STRATEGIES`` names the ways a WSNet layer can be lowered
(``strategy.StrategyPass`` applies them); it lives here, free of any tensor library, so the
command line lists it without importing one."""

STRATEGIES = ("auto", "fold", "shared", "custom")
