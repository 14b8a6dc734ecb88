"""The frozen-prefix cache: the graph cut, the store, the builder and the callback that serves it."""
