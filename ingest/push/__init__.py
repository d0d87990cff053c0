"""HTTP push from IoT platforms (CTWing, OneNET, IoTDA, plain http-json): DESIGN §12."""
