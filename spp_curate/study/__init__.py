"""``spp-curate study``: the papers' controlled comparison on one labelled source, as one resumable command.

:mod:`.plan` says what runs (pair sets, modes, methods, seeds, references, ablations), :mod:`.execute` builds,
trains and evaluates each once, :mod:`.supervised` is the supervised reference, and :mod:`.report` reads the
runs as means, spreads and paired differences in HTML and JSON.
"""
