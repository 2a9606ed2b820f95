"""Writing edgekit graphs in other frameworks' formats."""
