"""Models: how the student and the teacher are specified, built and loaded, and the preflight that compares them."""
