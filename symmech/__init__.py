"""symmech: symmetries of the loss -> exact laws of training dynamics -> live trackers."""
