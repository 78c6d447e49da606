"""DICOMweb (PS3.18): QIDO-RS, WADO-RS, WADO-URI, STOW-RS, translating HTTP to the protocol-free services."""
