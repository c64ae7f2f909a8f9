import dagster as dg

# One partition per registry entry. Dynamic, because people add models by editing a file.
MODELS = dg.DynamicPartitionsDefinition(name="models")
