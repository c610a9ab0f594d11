from mlops.serve.server import main

main()
