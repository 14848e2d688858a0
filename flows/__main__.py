from flows.serve import main

main()
