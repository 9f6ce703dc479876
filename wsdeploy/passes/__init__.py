"""Graph passes, one per file. ``STRATEGIES`` names the ways a WSNet layer can be lowered
(``strategy.StrategyPass`` applies them); it and the other choices below live here, free of
any tensor library, so the command line lists them without importing one."""

PRECISIONS = ("fp32", "int8")
"""What a build computes in (``compiler.export``; int8: ``wsdeploy.quantize``)."""

CALIB_METHODS = ("auto", "mse", "minmax")
"""How int8 calibration clips each activation (``quantize.calibrate``)."""

INT8_LAYOUTS = ("auto", "dense", "phi")
"""How int8 quantizes the layers a strategy folds on a target with ``integer_convs`` (ONNX
Runtime): "dense" as the dense convs they are built as (per output channel, 7 bits: the
runtime's integer kernels), "phi" with phi's per-condensed-channel scales (8 bits; the
runtime computes those layers in float after dequantizing their weights), "auto" dense
unless the accuracy gate refuses it, then phi (``compiler.export``). Other targets quantize
one way and ignore it."""

STRATEGIES = ("auto", "fold", "shared", "custom")

GOALS = ("balanced", "size", "speed")
"""What ``auto`` optimises: ``balanced`` (the default) takes the smaller WSNet lowering
unless the dense one is estimated faster by more than ``strategy.ESTIMATE_ERROR``, ``size``
always the smaller, ``speed`` whichever is estimated strictly faster."""
