def test_build(exports):
    print(exports)
