"""Dispatch: where trials run (in-process or Ray actors), behind the Dispatcher protocol."""
