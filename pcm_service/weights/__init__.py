"""Model weights: content-addressed chunks (``chunks``), which directories may be served
(``modelpaths``), who holds which chunk and who fetches what from whom (``replicas``), and
byte ranges (``ranges``). ``chunks`` and ``ranges`` are shared with the workers' blob servers."""
