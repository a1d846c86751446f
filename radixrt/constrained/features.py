"""placeholder"""
def check_schema(schema, backend):
    return None
