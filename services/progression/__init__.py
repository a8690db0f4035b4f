"""The write side: deals decided from prospect actions, kept as an event log."""
