module stickless.example/session

go 1.19
