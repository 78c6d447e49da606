"""Protocol-free use cases. DIMSE, DICOMweb, HL7, the console and the CLI all call these; none of them knows a protocol."""
