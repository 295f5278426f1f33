"""Send an SMS campaign to a spreadsheet of people through the Avaamo SMS Send API."""

__version__ = "0.1.0"
