"""The reference side of the parity harness: upstream's PyTorch modules run to make reference cases.

It mirrors ``cosyjax.parity.stages`` (which checks a case): ``config`` (CONFIG.yaml: the sizes the
upstream modules are built at), ``release`` (the release directory and upstream's modules built from
it), ``capture`` (golden arrays, hooks, taps on upstream's random draws), one module per stage group
(``llm``, ``flow``, ``hift``, ``tts``, ``train``) and ``make`` (``make_case``: build, run every group,
self-check, write).  Everything here imports torch; ``cosyjax`` itself never does.
"""
