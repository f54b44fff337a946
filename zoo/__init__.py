"""Floor 3: the frozen backbone, expert kinds, training, the zoo's store, prediction and the Hub."""
