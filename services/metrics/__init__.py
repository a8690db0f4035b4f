"""The read side of dealledger: projects deal events into read models and
serves the sales-process metrics computed from them."""
