"""Payload codecs per device model: vendor frames and JSON turned into v1 reading fields."""
