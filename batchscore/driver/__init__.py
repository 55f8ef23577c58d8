"""The driver's side of a run: Ray started or joined and the actors sized (`runtime`), the
run's state as parts arrive (`run`), its error budget (`budget`), progress lines and bars
(`progress`), and a function repeated from a thread while a block runs (`repeating`)."""
