"""A local stand-in for Atlas Cloud's image API, over real HTTP, quirks and faults included."""
