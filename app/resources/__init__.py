"""The app's data files (style sheet, icons), shipped as package data; read them with
`engine.resources.resource_path("app.resources", name)`."""
