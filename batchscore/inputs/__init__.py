"""Inputs: what a run reads. The driver lists the inputs (`listing`); workers read them
(`read`); both resolve paths and URIs through `fs` and know image formats from `formats`."""
