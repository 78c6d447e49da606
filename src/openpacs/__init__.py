"""OpenPACS: a picture archiving and communication system."""
__version__ = "0.1.0"
