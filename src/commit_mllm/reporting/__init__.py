"""Reporting: plots of a run's logs, and the markdown tables and reports that compare runs."""
