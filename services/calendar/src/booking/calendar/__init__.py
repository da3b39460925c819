"""The calendar service."""
